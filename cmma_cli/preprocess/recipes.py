"""Recipe rows: every synthesis recipe becomes a row of its own in ``processed/recipes.parquet``.

A recipe trains cmma only through the views it has itself: its procedure text and its target's composition
(the composition hub, :mod:`cmma_cli.modalities.composition`). It needs no structure, so all of them count, not
only the few whose target has a structure in the workspace. The rows come from ``raw/recipes.parquet`` (every
recipe a local fetch read), else from the distinct recipes of ``raw/synthesis.parquet`` (those linked to a
material). Each modality says what it finds in a recipe (:meth:`~cmma_cli.modalities.base.Modality.gather_recipes`)
and featurizes it as it featurizes a material without a structure.

Columns: ``material_id`` (the recipe id; never the id of a material), ``formula`` (the target's reduced formula),
``elements``, ``doi``, ``synthesis_type``, ``split``, and the modality columns of :mod:`cmma_cli.preprocess`.

Splits follow the materials': a recipe whose target falls in the group (reduced formula, or chemical system) of a
material takes that material's split, so a held-out material's recipes are held out with it; the other recipes'
groups are cut by the same seeded rule (:func:`~cmma_cli.preprocess.splits.assign_splits`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from cmma_cli.composition import key_of, material_fractions
from cmma_cli.modalities.base import Modality
from cmma_cli.preprocess.featurize import featurize
from cmma_cli.preprocess.splits import assign_splits, group_keys
from cmma_cli.preprocess.stream import modality_fields, modality_table

RECIPES_FILE = "recipes.parquet"
#: Identity columns of a recipe row, before the modality columns.
RECIPE_FIELDS = (pa.field("material_id", pa.string()), pa.field("formula", pa.string()),
                 pa.field("elements", pa.list_(pa.string())), pa.field("doi", pa.string()),
                 pa.field("synthesis_type", pa.string()), pa.field("split", pa.string()))


def raw_recipes(raw_dir: Path) -> pd.DataFrame | None:
    """Every recipe in ``raw/`` (``recipe_id``, ``doi``, ``synthesis_type``, ``target_formula``, ``record`` as a
    dict, and ``target_fractions``: the target's nominal composition, or None), or None when fetch kept none."""
    from cmma_cli.workspace import read_table

    path = raw_dir / "recipes.parquet"
    if path.exists():
        table = read_table(path, columns=["recipe_id", "doi", "synthesis_type", "target_formula", "record"])
    elif (raw_dir / "synthesis.parquet").exists():
        table = read_table(raw_dir / "synthesis.parquet",
                           columns=["recipe_id", "doi", "synthesis_type", "target_formula", "record"])
        table = table.drop_duplicates("recipe_id").reset_index(drop=True)
    else:
        return None
    if table.empty:
        return None

    def parse(record: Any) -> dict | None:
        try:
            value = json.loads(record) if isinstance(record, str) else record
        except (ValueError, RecursionError):
            return None
        return value if isinstance(value, dict) else None

    table["record"] = table["record"].map(parse)
    table["target_fractions"] = table["record"].map(lambda r: material_fractions(r.get("target")) if r else None)
    return table


def recipe_splits(recipes: pd.DataFrame, material_splits: pd.DataFrame, val_fraction: float, test_fraction: float,
                  seed: int, split_by: str) -> pd.Series:
    """Each recipe row's split: its group's materials' split where the group has materials, else a seeded cut of
    the recipe-only groups (``recipes`` needs ``material_id``, ``formula``, ``elements``)."""
    keys = group_keys(recipes, split_by).to_numpy()
    known = dict(zip(material_splits["group"], material_splits["split"]))
    split = pd.Series([known.get(k) for k in keys], index=recipes.index, dtype=object)
    alone = split.isna().to_numpy()
    if alone.any():
        cut = assign_splits(recipes[alone], val_fraction, test_fraction, seed, split_by, fallback_to_materials=False)
        split[alone] = cut["split"].to_numpy()
    return split


def recipe_rows(raw_dir: Path, cfg: Any, modalities: list[Modality], material_splits: pd.DataFrame,
                rejects: list[dict]) -> tuple[pa.Table | None, dict[str, int]]:
    """The recipe rows (see the module docstring) and their counts; ``(None, {})`` without recipes.

    A recipe without a composed text or a resolvable target composition still becomes a row when it has one of
    them; one with neither is a reject."""
    recipes = raw_recipes(raw_dir)
    if recipes is None:
        return None, {}
    linked = {m.name: m.gather_recipes(getattr(cfg, m.name, None), recipes) for m in modalities}
    results, keep, formulas, elements = [], [], [], []
    counts = {"recipes": len(recipes), "unreadable": 0, "no_target_composition": 0}
    for i, rid in enumerate(recipes["recipe_id"].astype(str)):
        found = {name: values[rid] for name, values in linked.items() if rid in values}
        record = recipes["record"].iat[i]
        if record is None:
            counts["unreadable"] += 1
            rejects.append({"source": "recipe", "item": rid, "reason": "unreadable recipe record"})
            continue
        fractions = recipes["target_fractions"].iat[i]
        if fractions is None:
            counts["no_target_composition"] += 1
        if not found:
            rejects.append({"source": "recipe", "item": rid, "reason": "neither a procedure text nor a target "
                                                                      "composition could be read"})
            continue
        results.append(featurize(rid, None, found, cfg, modalities, has_structure=False))
        keep.append(i)
        formulas.append(_formula(fractions, recipes["target_formula"].iat[i]))
        elements.append(sorted(fractions) if fractions else [])
    counts["rows"] = len(keep)
    if not keep:
        return None, counts
    kept = recipes.iloc[keep].reset_index(drop=True)
    frame = pd.DataFrame({"material_id": kept["recipe_id"].astype(str), "formula": formulas, "elements": elements})
    split = recipe_splits(frame, material_splits, cfg.val_fraction, cfg.test_fraction, cfg.seed, cfg.split_by)
    base = pa.table({
        "material_id": pa.array(frame["material_id"].tolist(), pa.string()),
        "formula": pa.array(formulas, pa.string()),
        "elements": pa.array(elements, pa.list_(pa.string())),
        "doi": pa.array([d if isinstance(d, str) else None for d in kept["doi"]], pa.string()),
        "synthesis_type": pa.array([t if isinstance(t, str) else None for t in kept["synthesis_type"]], pa.string()),
        "split": pa.array(split.tolist(), pa.string()),
    })
    table = modality_table(base, results, modalities)
    schema = pa.schema(list(RECIPE_FIELDS) + modality_fields(modalities))
    for r in results:
        rejects.extend({"source": s, "item": it, "reason": why} for s, it, why in r.rejects)
    counts.update({f"{s}_recipes": int((split == s).sum()) for s in ("train", "val", "test")})
    return table.cast(schema), counts


def _formula(fractions: dict[str, float] | None, written: Any) -> str:
    """A recipe target's reduced formula (from its resolved composition), else the formula as written."""
    if fractions:
        return key_of(fractions)
    return str(written or "")
