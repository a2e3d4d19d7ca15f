"""Train / validation / test splits grouped so that related materials never straddle two splits.

The group of a material is its reduced composition (``split_by="composition"``: polymorphs and
duplicate entries share it) or its chemical system (``split_by="chemsys"``: every material made of
the same set of elements, e.g. all of Li-Fe-O). Groups are ordered by a seeded hash of their key and
cut into consecutive runs holding ``1 - val - test``, ``val`` and ``test`` of the *materials*, so:
the same seed and materials always give the same split, whatever the row order; every group lands in
exactly one split; and fractions are met to within one group.
"""

from __future__ import annotations

import hashlib
from functools import cache

import numpy as np
import pandas as pd
from pymatgen.core import Composition

SPLITS = ("train", "val", "test")
GROUPINGS = ("composition", "chemsys")


@cache
def reduced_formula(formula: str) -> str:
    """The reduced formula of ``formula`` (``Fe4O6`` -> ``Fe2O3``); the input itself if unparsable."""
    try:
        return Composition(formula).reduced_formula
    except Exception:  # a formula pymatgen cannot read is still a usable (if strict) group key
        return formula


def group_keys(materials: pd.DataFrame, split_by: str = "composition") -> pd.Series:
    """The grouping key of every material (needs ``formula``; ``elements`` for ``chemsys``)."""
    if split_by == "composition":
        return materials["formula"].astype(str).map(reduced_formula)
    if split_by == "chemsys":
        return materials["elements"].map(lambda els: "-".join(sorted(str(e) for e in els)))
    raise ValueError(f"split_by must be one of {GROUPINGS}, not {split_by!r}")


def _rank(key: str, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest(), "big")


def assign_splits(
    materials: pd.DataFrame,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    split_by: str = "composition",
) -> pd.DataFrame:
    """``material_id``, ``split`` and ``group`` for every row of ``materials`` (in its order)."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val and test fractions must be in [0, 1) and sum to less than 1")
    groups = group_keys(materials, split_by)
    sizes = groups.value_counts(sort=False)
    order = sorted(sizes.index, key=lambda k: (_rank(k, seed), k))
    counts = sizes.loc[order].to_numpy()
    # a group belongs to the split where the middle of its run of materials falls
    middle = (np.cumsum(counts) - counts / 2.0) / max(counts.sum(), 1)
    bounds = [1.0 - val_fraction - test_fraction, 1.0 - test_fraction]
    which = np.searchsorted(bounds, middle, side="right")
    split_of = dict(zip(order, (SPLITS[i] for i in which)))
    return pd.DataFrame(
        {
            "material_id": materials["material_id"].astype(str).to_numpy(),
            "split": groups.map(split_of).to_numpy(),
            "group": groups.to_numpy(),
        }
    )
