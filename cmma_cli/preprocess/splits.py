"""Train / validation / test splits grouped so that related materials never straddle two splits.

The group of a material is its reduced composition (``split_by="composition"``: polymorphs and
duplicate entries share it) or its chemical system (``split_by="chemsys"``: every material made of
the same set of elements, e.g. all of Li-Fe-O). Groups are ordered by a seeded hash of their key and
cut into consecutive runs holding ``1 - val - test``, ``val`` and ``test`` of the *materials*, so:
the same seed and materials always give the same split, whatever the row order; every group lands in
exactly one split; and fractions are met to within one group. Where grouping holds no material out of
train at all (a data set of one composition, such as Carbon-24), materials are split one by one instead,
and preprocess says so.
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
    fallback_to_materials: bool = True,
) -> pd.DataFrame:
    """``material_id``, ``split`` and ``group`` for every row of ``materials`` (in its order).

    When the groups are too few to hold any material out of train (val and test, as asked for with a fraction
    above 0, both empty: a data set of one composition), and
    ``fallback_to_materials``, the materials are split one by one instead (each its own group for the cut;
    ``group`` still holds the key) and ``attrs["fallback"]`` of the frame is True."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val and test fractions must be in [0, 1) and sum to less than 1")
    groups = group_keys(materials, split_by)
    split = _cut(groups, val_fraction, test_fraction, seed)
    fallback = False
    wanted = [name for name, fraction in (("val", val_fraction), ("test", test_fraction)) if fraction > 0]
    if fallback_to_materials and wanted and not split.isin(wanted).any():
        # grouping holds nothing out (Carbon-24: every material is C): split material by material
        ids = materials["material_id"].astype(str).reset_index(drop=True)
        per_material = _cut(ids, val_fraction, test_fraction, seed)
        if sum((per_material == n).any() for n in wanted) > sum((split == n).any() for n in wanted):
            split, fallback = per_material, True
    out = pd.DataFrame(
        {
            "material_id": materials["material_id"].astype(str).to_numpy(),
            "split": split.to_numpy(),
            "group": groups.to_numpy(),
        }
    )
    out.attrs["fallback"] = fallback  # True: grouped splits left val or test empty, so materials were split one by one
    return out


def _cut(groups: pd.Series, val_fraction: float, test_fraction: float, seed: int) -> pd.Series:
    """The split of every row, given its group key: groups in seeded-hash order, cut by the share of rows."""
    sizes = groups.value_counts(sort=False)
    order = sorted(sizes.index, key=lambda k: (_rank(k, seed), k))
    counts = sizes.loc[order].to_numpy()
    # a group belongs to the split where the middle of its run of materials falls
    middle = (np.cumsum(counts) - counts / 2.0) / max(counts.sum(), 1)
    bounds = [1.0 - val_fraction - test_fraction, 1.0 - test_fraction]
    which = np.searchsorted(bounds, middle, side="right")
    split_of = dict(zip(order, (SPLITS[i] for i in which)))
    return groups.map(split_of)
