"""Splits: grouped by reduced composition (or chemical system), seeded, order-independent."""

from __future__ import annotations

import pandas as pd
import pytest

from cmma_cli.preprocess.splits import assign_splits, group_keys


@pytest.fixture(scope="module")
def mp20(shared_data) -> pd.DataFrame:
    df = pd.read_csv(shared_data / "mp20" / "mp20_sample.csv")
    return pd.DataFrame(
        {
            "material_id": df["material_id"],
            "formula": df["pretty_formula"],
            "elements": df["elements"].map(lambda s: s.strip("[]").replace("'", "").replace(" ", "").split(",")),
        }
    )


def test_no_reduced_formula_straddles_two_splits(mp20):
    splits = assign_splits(mp20, 0.1, 0.1, seed=0)
    assert splits["material_id"].tolist() == mp20["material_id"].tolist()
    assert splits.groupby("group")["split"].nunique().max() == 1
    # MP-20 holds polymorphs (several ids per formula); each formula's ids all share one split
    polymorphs = mp20.groupby("formula")["material_id"].count()
    assert (polymorphs > 1).sum() > 5
    merged = mp20.assign(split=splits["split"])
    assert merged.groupby("formula")["split"].nunique().max() == 1


def test_fractions_are_met_to_within_one_group(mp20):
    counts = assign_splits(mp20, 0.1, 0.15, seed=3)["split"].value_counts()
    n, largest = len(mp20), mp20.groupby("formula").size().max()
    assert abs(counts["val"] - 0.1 * n) <= largest
    assert abs(counts["test"] - 0.15 * n) <= largest
    assert counts.sum() == n


def test_same_seed_same_split_whatever_the_row_order(mp20):
    first = assign_splits(mp20, seed=7).set_index("material_id")["split"]
    shuffled = mp20.sample(frac=1.0, random_state=1)
    again = assign_splits(shuffled, seed=7).set_index("material_id")["split"]
    assert again.loc[first.index].tolist() == first.tolist()
    other_seed = assign_splits(mp20, seed=8).set_index("material_id")["split"]
    assert (other_seed.loc[first.index] != first).sum() > 50


def test_chemical_system_split_keeps_each_system_in_one_split(mp20):
    splits = assign_splits(mp20, seed=0, split_by="chemsys")
    systems = mp20["elements"].map(lambda e: "-".join(sorted(e)))
    assert splits["group"].tolist() == systems.tolist()
    assert mp20.assign(split=splits["split"]).assign(sys=systems).groupby("sys")["split"].nunique().max() == 1


def test_group_key_is_the_reduced_formula():
    df = pd.DataFrame(
        {"material_id": ["a", "b", "c"], "formula": ["Fe2O3", "Fe4O6", "FeO"], "elements": [["Fe", "O"]] * 3}
    )
    assert group_keys(df).tolist() == ["Fe2O3", "Fe2O3", "FeO"]
    splits = assign_splits(df, 0.3, 0.3, seed=0)
    assert splits.loc[0, "split"] == splits.loc[1, "split"]
    with pytest.raises(ValueError, match="split_by"):
        group_keys(df, "spacegroup")
