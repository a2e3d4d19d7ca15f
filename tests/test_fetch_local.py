"""`cmma fetch --source local`: shared CSVs, CIF folders, recipe files, and the error sentences."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from pymatgen.core import Lattice, Structure

from cmma_cli.workspace import read_manifest


def _read(ws, name):
    return pd.read_parquet(ws / "raw" / f"{name}.parquet")


@pytest.fixture(scope="module")
def mp20_ws(tmp_path_factory, shared_data):
    """MP-20 sample plus the solid-state recipes, fetched once for the module."""
    from typer.testing import CliRunner

    from cmma_cli.cli import app

    ws = tmp_path_factory.mktemp("mp20")
    result = CliRunner().invoke(
        app,
        ["fetch", "-w", str(ws), str(shared_data / "mp20" / "mp20_sample.csv"),
         str(shared_data / "synthesis" / "solid-state_dataset_2019-12-03.json.xz")],
    )
    assert result.exit_code == 0, result.output
    return ws, result.output


def test_mp20_rows_properties_and_no_rejects(mp20_ws, shared_data):
    ws, output = mp20_ws
    m = _read(ws, "materials")
    src = pd.read_csv(shared_data / "mp20" / "mp20_sample.csv")
    assert len(m) == 1130 and m["material_id"].is_unique
    assert len(_read(ws, "rejects")) == 0
    merged = m.merge(src, on="material_id")
    # properties survive under their canonical names (e_above_hull -> energy_above_hull)
    assert (merged["formation_energy_per_atom_x"].astype(float) - merged["formation_energy_per_atom_y"]).abs().max() < 1e-9
    assert (merged["energy_above_hull"].astype(float) - merged["e_above_hull"]).abs().max() < 1e-9
    assert (merged["spacegroup_number"].astype(int) == merged["spacegroup.number"]).all()
    assert (merged["formula"] == merged["pretty_formula"]).mean() > 0.99
    assert set(m["crystal_system"].dropna()) <= {"triclinic", "monoclinic", "orthorhombic", "tetragonal",
                                                 "trigonal", "hexagonal", "cubic"}
    structure = Structure.from_dict(json.loads(m.loc[0, "structure"]))
    assert len(structure) == m.loc[0, "nsites"]
    manifest = read_manifest(ws / "raw")
    assert manifest["rows"]["materials"] == 1130
    assert {"formation_energy_per_atom", "band_gap", "energy_above_hull"} <= set(manifest["properties"])


def test_mp20_recipes_link_by_formula_and_mp_id(mp20_ws):
    ws, output = mp20_ws
    s = _read(ws, "synthesis")
    m = _read(ws, "materials")
    assert s["material_id"].nunique() == 49  # the data README's count for strict reduced-formula matching
    assert set(s["link_method"]) == {"formula", "mp_id"}
    formula = dict(zip(m["material_id"], m["formula"]))
    for row in s.itertuples():
        record = json.loads(row.record)
        if row.link_method == "mp_id":
            assert record["target"]["mp_id"] == row.material_id
        else:
            from pymatgen.core import Composition

            assert Composition(record["target"]["material_formula"]).reduced_formula == formula[row.material_id]
    assert (s["synthesis_type"] == "solid-state").all()
    assert "Recipes read: 30,031" in output


def test_perov5_imports_with_extra_properties(tmp_path, cli, shared_data):
    result = cli("fetch", "-w", tmp_path, shared_data / "perov5" / "perov5_val.csv")
    assert result.exit_code == 0, result.output
    m = _read(tmp_path, "materials")
    assert len(m) == 3787 and len(_read(tmp_path, "rejects")) == 0
    assert {"heat_all", "heat_ref", "dir_gap", "ind_gap"} <= set(m.columns)
    assert m["heat_all"].notna().all()
    assert (m["nsites"] == 5).all()
    assert m["crystal_system"].notna().all() and (m["crystal_system"] == "cubic").any()
    # an unchanged second run skips, --force redoes
    again = cli("fetch", "-w", tmp_path, shared_data / "perov5" / "perov5_val.csv")
    assert "up to date" in again.output
    created = read_manifest(tmp_path / "raw")["created"]
    forced = cli("fetch", "-w", tmp_path, "--force", "--limit", "10", shared_data / "perov5" / "perov5_val.csv")
    assert forced.exit_code == 0 and len(_read(tmp_path, "materials")) == 10
    assert read_manifest(tmp_path / "raw")["created"] > created


def _cif_folder(tmp_path):
    folder = tmp_path / "cifs"
    folder.mkdir()
    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    si = Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.431), ["Si"], [[0, 0, 0]])
    nacl.to(filename=str(folder / "NaCl.cif"))
    si.to(filename=str(folder / "Si.cif"))
    (folder / "broken.cif").write_text("data_broken\n_cell_length_a 4.0\nthis is not a CIF loop\n")
    return folder


def test_cif_folder_with_one_broken_file(tmp_path, cli):
    folder = _cif_folder(tmp_path)
    ws = tmp_path / "ws"
    result = cli("fetch", "-w", ws, folder)
    assert result.exit_code == 0, result.output
    m = _read(ws, "materials").set_index("material_id")
    assert sorted(m.index) == ["NaCl", "Si"]
    assert m.loc["NaCl", "nsites"] == 8 and m.loc["Si", "nsites"] == 8
    assert m.loc["NaCl", "spacegroup_number"] == 225 and m.loc["Si", "crystal_system"] == "cubic"
    assert m.loc["NaCl", "density"] == pytest.approx(2.165, abs=0.01)
    rejects = _read(ws, "rejects")
    assert list(rejects["item"]) == ["broken"]
    assert "CIF" in rejects.loc[0, "reason"]
    assert "1 (see raw/rejects.parquet)" in result.output


def test_json_lines_recipes_link_to_cif_folder(tmp_path, cli):
    folder = _cif_folder(tmp_path)
    recipes = tmp_path / "recipes.jsonl"
    lines = [
        {"doi": "10.1/a", "target": {"material_formula": "Na4Cl4"}, "precursors": [{"material_formula": "Na2CO3"}],
         "operations": [], "reaction_string": "x", "paragraph_string": "p", "synthesis_type": "solid-state"},
        {"doi": "10.1/b", "target": {"material_formula": "La1-xSrxMnO3"}, "operations": []},
        {"doi": "10.1/c", "target": {}, "operations": []},
    ]
    recipes.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    ws = tmp_path / "ws"
    result = cli("fetch", "-w", ws, folder, recipes)
    assert result.exit_code == 0, result.output
    s = _read(ws, "synthesis")
    assert list(s["material_id"]) == ["NaCl"] and list(s["link_method"]) == ["formula"]
    assert list(s.iloc[0]["precursors"]) == ["Na2CO3"]
    rejects = _read(ws, "rejects")
    assert "recipe names no target" in set(rejects["reason"])
    counts = read_manifest(ws / "raw")["counts"]
    assert counts["variable_target"] == 1 and counts["linked"] == 1


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing.csv", "does not exist"),
        (lambda p: (p / "notes.txt").write_text("hi") and p / "notes.txt", "Don't know how to read"),
        (lambda p: (p / "t.csv").write_text("material_id,band_gap\nx,1.0\n") and p / "t.csv", "has no CIF column"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "holds no .cif files"),
    ],
)
def test_bad_local_input_gets_one_sentence(tmp_path, cli, make, message):
    path = make(tmp_path)
    result = cli("fetch", "-w", tmp_path / "ws", path)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_failed_fetch_keeps_earlier_raw_data(tmp_path, cli):
    folder = _cif_folder(tmp_path)
    ws = tmp_path / "ws"
    assert cli("fetch", "-w", ws, folder).exit_code == 0
    before = (ws / "raw" / "materials.parquet").read_bytes()
    bad = cli("fetch", "-w", ws, tmp_path / "nope.csv")
    assert bad.exit_code == 2
    assert (ws / "raw" / "materials.parquet").read_bytes() == before
    assert read_manifest(ws / "raw") is not None


def test_paths_with_another_source_is_refused(tmp_path, cli):
    result = cli("fetch", "-w", tmp_path, "--source", "sample", tmp_path)
    assert result.exit_code == 2 and "only read with --source local" in result.output


def test_filters_apply_to_local_sources(tmp_path, cli):
    folder = _cif_folder(tmp_path)
    result = cli("fetch", "-w", tmp_path / "ws", folder, "--elements", "Na")
    assert result.exit_code == 0, result.output
    assert list(_read(tmp_path / "ws", "materials")["material_id"]) == ["NaCl"]
    result = cli("fetch", "-w", tmp_path / "ws2", folder, "--chemsys", "Fe-O")
    assert result.exit_code == 2 and "matched no materials" in result.output
