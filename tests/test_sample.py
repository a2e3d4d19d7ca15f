"""The built-in sample: count, every structure valid, descriptions present, real properties only, no network."""

from __future__ import annotations

import gzip
import json
import socket
import time
from importlib import resources
from pathlib import Path

import pymatgen.analysis.compatibility as compat_pkg
import pytest
from pymatgen.core import Composition, Structure

from cmma_cli.errors import CMMAError
from cmma_cli.sources import sample
from cmma_cli.sources.schema import DESCRIPTION_COLUMNS, MATERIAL_COLUMNS

#: What scripts/make_sample.py shipped: AFLOW prototypes and pymatgen bulk structures robocrys described.
EXPECTED_COUNT = 298
EXPECTED_BY_SOURCE = {"sample:aflow": 287, "sample:pymatgen": 11}
EXPECTED_WITH_ENTHALPY = 84


@pytest.fixture(scope="module")
def raw():
    """Load the sample once, with every socket connection refused: it must not touch the network."""
    original = socket.socket.connect

    def refuse(*_args, **_kwargs):
        raise AssertionError("the built-in sample tried to open a network connection")

    socket.socket.connect = refuse
    try:
        start = time.perf_counter()
        data = sample.load_sample()
        data.load_seconds = time.perf_counter() - start
    finally:
        socket.socket.connect = original
    return data


def test_the_sample_ships_as_package_data():
    resource = resources.files("cmma_cli") / "data" / sample.SAMPLE_FILE
    assert resource.is_file()
    with resources.as_file(resource) as path:
        assert Path(path).stat().st_size < 5_000_000


def test_count_and_provenance(raw):
    materials = raw.materials
    assert len(materials) == EXPECTED_COUNT >= 250
    assert materials["source"].value_counts().to_dict() == EXPECTED_BY_SOURCE
    assert materials["material_id"].is_unique
    aflow = materials[materials["source"] == "sample:aflow"]
    assert aflow["material_id"].str.fullmatch(r"aflow:[A-Za-z0-9_]+:[A-Za-z0-9().]+").all()
    # the AFLOW id ends in the reduced formula of its structure
    assert (aflow["material_id"].str.rsplit(":", n=1).str[1] == aflow["formula"]).all()
    assert list(materials.columns[: len(MATERIAL_COLUMNS)]) == MATERIAL_COLUMNS


def test_every_structure_parses_back(raw):
    for row in raw.materials.itertuples(index=False):
        structure = Structure.from_dict(json.loads(row.structure))
        assert len(structure) == row.nsites > 0
        assert structure.composition.reduced_formula == row.formula
        assert sorted(el.symbol for el in structure.composition.elements) == list(row.elements)
        assert structure.volume > 0


def test_symmetry_and_density_are_computed_for_every_material(raw):
    materials = raw.materials
    assert materials["spacegroup_number"].between(1, 230).all()
    assert materials["crystal_system"].notna().all()
    # solids from solid hydrogen (~0.09) to osmium (22.6 g/cm^3)
    assert materials["density"].between(0.05, 23.0).all()
    nacl = materials.set_index("material_id").loc["aflow:AB_cF8_225_a_b:NaCl"]
    assert nacl["spacegroup_number"] == 225
    assert nacl["crystal_system"] == "cubic"
    assert nacl["density"] == pytest.approx(2.16, abs=0.05)  # halite, 2.165 g/cm^3


def test_every_material_has_a_robocrys_description_naming_its_elements(raw):
    descriptions = raw.descriptions
    assert list(descriptions.columns) == DESCRIPTION_COLUMNS
    assert descriptions["material_id"].is_unique
    assert set(descriptions["material_id"]) == set(raw.materials["material_id"])
    assert (descriptions["source"] == "robocrys").all()
    text = descriptions.set_index("material_id")["description"]
    for row in raw.materials.itertuples(index=False):
        description = text[row.material_id]
        assert len(description) > 40
        assert all(element in description for element in row.elements), row.material_id
    assert "crystallizes in" in text["aflow:AB_cF8_225_a_b:NaCl"]


def test_formation_enthalpies_are_pymatgens_experimental_values_and_only_those(raw):
    with gzip.open(Path(compat_pkg.__path__[0]) / "exp_compounds.json.gz", "rt") as fh:
        exp = json.load(fh)
    per_atom: dict[str, list[float]] = {}
    for entry in exp:
        comp = Composition(entry["formula"])
        per_atom.setdefault(comp.reduced_formula, []).append(entry["exp energy"] / comp.num_atoms)
    materials = raw.materials
    known = materials[materials["formation_energy_per_atom"].notna()]
    assert len(known) == EXPECTED_WITH_ENTHALPY > 0
    assert known["formation_energy_per_atom"].between(-5.0, 0.5).all()
    for row in known.itertuples(index=False):
        assert any(abs(row.formation_energy_per_atom - v) < 1e-9 for v in per_atom[row.formula]), row.material_id
    # halite: -411.2 kJ/mol per NaCl = -2.131 eV/atom
    nacl = materials.set_index("material_id").loc["aflow:AB_cF8_225_a_b:NaCl", "formation_energy_per_atom"]
    assert nacl == pytest.approx(-2.131, abs=0.002)
    # elements have no formation enthalpy entry, and none is made up for them
    elemental = materials[materials["elements"].map(len) == 1]
    assert len(elemental) > 20 and elemental["formation_energy_per_atom"].isna().all()
    # nothing the sample has no source for is filled in
    for column in ("band_gap", "energy_above_hull", "is_stable", "is_metal", "bulk_modulus_vrh"):
        assert materials[column].isna().all(), column


def test_the_sample_has_no_synthesis_and_no_rejects(raw):
    assert raw.synthesis.empty
    assert raw.rejects == []


def test_loading_is_fast(raw):
    assert raw.load_seconds < 30


def test_limit_keeps_the_first_materials():
    data = sample.load_sample(limit=5)
    assert len(data.materials) == 5 == len(data.descriptions)
    assert list(data.materials["material_id"]) == list(sample.read_sample_table()["material_id"][:5])
    with pytest.raises(CMMAError, match="positive number"):
        sample.load_sample(limit=0)


def test_a_missing_sample_file_says_what_to_do(monkeypatch):
    monkeypatch.setattr(sample, "SAMPLE_FILE", "no_such_sample.parquet")
    with pytest.raises(CMMAError, match="reinstall cmma"):
        sample.load_sample()


def test_the_shipped_table_records_its_provenance():
    table = sample.read_sample_table()
    assert table["origin"].notna().all()
    aflow = table[table["collection"] == "aflow"]
    assert aflow["reference"].str.contains("@article").all()
    assert aflow["origin"].eq("pymatgen/analysis/prototypes/aflow_prototypes.json.gz").all()
