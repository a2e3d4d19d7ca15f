"""Which processed columns are material properties: the numbers probes, baselines and ``--objective predict`` regress."""

from __future__ import annotations

import pandas as pd

#: Numeric properties that are categories or identifiers, not quantities to regress.
NOT_REGRESSED = {"spacegroup_number", "nsites"}
#: Processed columns that are identity, text or modality data, never a property.
NON_PROPERTY = {"material_id", "formula", "elements", "source", "description", "synthesis_texts", "recipe_ids",
                "xrd", "xrd_source", "image_path", "atomic_numbers", "edge_src", "edge_dst", "edge_dist",
                "edge_vec", "structure"}


def numeric_properties(materials: pd.DataFrame, candidates: list[str]) -> list[str]:
    """The columns of ``candidates`` holding numbers to regress (not booleans, not categories)."""
    out = []
    for name in candidates:
        if name in NON_PROPERTY or name in NOT_REGRESSED or name not in materials:
            continue
        column = materials[name]
        if pd.api.types.is_bool_dtype(column) or not pd.api.types.is_numeric_dtype(column):
            continue
        out.append(name)
    return out
