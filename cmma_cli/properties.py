"""Which processed columns are material properties: the numbers probes, baselines and ``--objective predict`` regress."""

from __future__ import annotations

import pandas as pd

#: Numeric properties that are categories or identifiers, not quantities to regress.
NOT_REGRESSED = {"spacegroup_number", "nsites"}
#: Identity columns of every material (and the raw structure column), never a property.
IDENTITY = {"material_id", "formula", "elements", "source"}


def non_property() -> set[str]:
    """Processed columns that are identity or modality data, never a property: :data:`IDENTITY`, the raw
    structure column and every column a registered modality writes (its ``fields``)."""
    from cmma_cli.modalities import REGISTRY
    from cmma_cli.sources.schema import STRUCTURE_COLUMN

    return IDENTITY | {STRUCTURE_COLUMN} | {f.name for m in REGISTRY.values() for f in m.fields}


def numeric_properties(materials: pd.DataFrame, candidates: list[str]) -> list[str]:
    """The columns of ``candidates`` holding numbers to regress (not booleans, not categories)."""
    skip = non_property() | NOT_REGRESSED
    out = []
    for name in candidates:
        if name in skip or name not in materials:
            continue
        column = materials[name]
        if pd.api.types.is_bool_dtype(column) or not pd.api.types.is_numeric_dtype(column):
            continue
        out.append(name)
    return out
