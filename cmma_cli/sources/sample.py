"""The built-in sample: real crystal structures shipped inside the package, for ``cmma fetch`` with no key.

``cmma_cli/data/sample_materials.parquet`` holds about 300 experimentally reported structures that
pymatgen ships (the AFLOW Library of Crystallographic Prototypes, and pymatgen's own bulk test
structures), each with a Robocrystallographer description and, where pymatgen's experimental table
has an unambiguous match, the experimental formation enthalpy (eV/atom). ``scripts/make_sample.py``
made it and says how; nothing in it is invented. Loading it needs no network and takes seconds.
"""

from __future__ import annotations

import json
from importlib import resources

import pandas as pd
from pymatgen.core import Structure

from cmma_cli.errors import CMMAError
from cmma_cli.sources.schema import RawData, conform_descriptions, conform_materials
from cmma_cli.sources.structures import material_record

#: The shipped table, inside the ``cmma_cli`` package.
SAMPLE_FILE = "sample_materials.parquet"

#: The ``source`` of every description in the sample.
DESCRIPTION_SOURCE = "robocrys"


def load_sample(limit: int | None = None) -> RawData:
    """The built-in sample as raw tables: materials (symmetry and density computed), descriptions, no synthesis.

    ``limit`` keeps only the first ``limit`` materials (in the shipped order), for quick trials.
    """
    table = read_sample_table()
    if limit is not None:
        if limit < 1:
            raise CMMAError(f"The sample limit must be a positive number of materials, not {limit}.")
        table = table.head(limit)
    rows = []
    for rec in table.itertuples(index=False):
        structure = Structure.from_dict(json.loads(rec.structure))
        energy = rec.formation_energy_per_atom
        rows.append(
            material_record(
                rec.material_id,
                structure,
                f"sample:{rec.collection}",
                formation_energy_per_atom=None if pd.isna(energy) else float(energy),
            )
        )
    materials, extra = conform_materials(pd.DataFrame(rows))
    descriptions = conform_descriptions(
        pd.DataFrame(
            {
                "material_id": table["material_id"].to_numpy(),
                "description": table["description"].to_numpy(),
                "source": DESCRIPTION_SOURCE,
            }
        )
    )
    return RawData(materials=materials, descriptions=descriptions, extra_properties=extra)


def read_sample_table() -> pd.DataFrame:
    """The shipped table as stored: ids, structure JSON, descriptions, properties and provenance columns."""
    resource = resources.files("cmma_cli") / "data" / SAMPLE_FILE
    if not resource.is_file():
        raise CMMAError(
            f"The built-in sample ({SAMPLE_FILE}) is missing from this cmma installation; reinstall cmma, "
            "or regenerate it from a source checkout with scripts/make_sample.py."
        )
    with resources.as_file(resource) as path:
        return pd.read_parquet(path)
