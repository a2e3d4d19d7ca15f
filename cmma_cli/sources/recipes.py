"""Synthesis recipes: read them, and link them to materials the way the Materials Project does.

A recipe in the Materials Project / text-mined layout (Kononova et al. 2019) names its target by formula
(``target.material_formula``) and sometimes by Materials Project id (``target.mp_id``). The Materials Project
synthesis search keys recipes by DOI and formula, not by material id, so linking is:

1. ``mp_id``: the recipe names a material id that we have -> linked to that material only;
2. ``formula``: otherwise, the recipe's target reduced formula equals a material's reduced formula ->
   linked to every such material (polymorphs share recipes, as they share the formula).

Each link records which rule made it (``link_method``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import warnings
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
from pymatgen.core import Composition

from cmma_cli.sources.schema import conform_synthesis, empty_synthesis


def read_recipe_file(path: Path) -> list[dict[str, Any]]:
    """Recipes from a JSON file (a list, or ``{"reactions": [...]}`` as published) or JSON lines; .gz/.xz ok."""
    opener = {".xz": lzma.open, ".gz": gzip.open}.get(path.suffix, open)
    with opener(path, "rt", encoding="utf-8") as fh:
        text = fh.read()
    stripped = text.lstrip()
    if stripped.startswith("[") or stripped.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        except RecursionError:  # [[[[...]]]] thousands deep: no recipe, and no traceback
            raise ValueError("it is nested too deeply to be a recipe file") from None
        if isinstance(data, list):
            return data
        if isinstance(data, dict):
            for key in ("reactions", "data", "recipes"):
                if isinstance(data.get(key), list):
                    return data[key]
            return [data]
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"line {n} is not JSON ({exc.msg})") from None
            except RecursionError:
                raise ValueError(f"line {n} is nested too deeply to be a recipe") from None
    return records


def target_formula(record: dict[str, Any]) -> str | None:
    """The target's formula as written in the recipe, or ``None``."""
    target = record.get("target") or {}
    formula = target.get("material_formula") or target.get("material_string")
    if not formula:
        formulas = record.get("targets_formula") or record.get("targets_string") or []
        formula = formulas[0] if formulas else None
    return formula or None


def reduced_formula(formula: str | None) -> str | None:
    """The reduced formula of ``formula``, or ``None`` when it is not a plain composition (e.g. ``Li1+xFeO2``)."""
    if not formula:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            comp = Composition(formula)
        if comp.num_atoms <= 0:
            return None
        return comp.reduced_formula
    except Exception:
        return None


def recipe_id(record: dict[str, Any]) -> str:
    """A stable id: the record's own id if it has one, else a hash of DOI, target, reaction and paragraph."""
    for key in ("id", "_id", "recipe_id"):
        if record.get(key):
            return str(record[key])
    blob = json.dumps(
        [record.get("doi"), target_formula(record), record.get("reaction_string"), record.get("paragraph_string")],
        default=str,
    )
    return "rcp-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def precursor_formulas(record: dict[str, Any]) -> list[str]:
    out = []
    for p in record.get("precursors") or []:
        formula = p.get("material_formula") or p.get("material_string") if isinstance(p, dict) else p
        if formula:
            out.append(str(formula))
    return out


#: Columns of raw/recipes.parquet: every recipe read, one row each, whether or not a structure matches it.
RECIPE_COLUMNS = ["recipe_id", "doi", "synthesis_type", "target_formula", "reaction_string", "precursors", "record"]


def recipe_table(records: Iterable[Any]) -> pd.DataFrame:
    """Every recipe (a JSON object naming a target) as one row, duplicates (same id) once, in
    :data:`RECIPE_COLUMNS`; ``record`` is the whole recipe as JSON. Recommending and composition-side training
    need the recipes whose target has no structure too."""
    rows, seen = [], set()
    for record in records:
        if not isinstance(record, dict) or (target_formula(record) is None and not (record.get("target") or {}).get("mp_id")):
            continue
        rid = recipe_id(record)
        if rid in seen:
            continue
        seen.add(rid)
        rows.append({"recipe_id": rid, "doi": record.get("doi"), "synthesis_type": record.get("synthesis_type"),
                     "target_formula": target_formula(record), "reaction_string": record.get("reaction_string"),
                     "precursors": precursor_formulas(record), "record": json.dumps(record, default=str)})
    if not rows:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in RECIPE_COLUMNS})
    return pd.DataFrame(rows, columns=RECIPE_COLUMNS)


def link_recipes(
    records: Iterable[dict[str, Any]], materials: pd.DataFrame, source: str = "recipes"
) -> tuple[pd.DataFrame, dict[str, int], list[dict[str, str]]]:
    """Link recipes to ``materials`` (raw schema). Returns (links, counts, rejects).

    ``counts`` has ``recipes`` (read), ``linked`` (recipes with at least one link), ``links`` (rows),
    ``unlinked`` (the target is not among the materials), ``variable_target`` (the target is not a fixed
    composition, e.g. ``La1-xCaxMnO3`` or ``barium titanate``, so no single structure matches it) and
    ``rejected`` (not a recipe at all: no target, not an object; these are also returned as rejects).
    Duplicate recipes (same id) are read once.
    """
    ids = set(materials["material_id"])
    by_formula: dict[str, list[str]] = {}
    for mid, formula in zip(materials["material_id"], materials["formula"]):
        by_formula.setdefault(formula, []).append(mid)

    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, str]] = []
    seen: set[str] = set()
    counts = {"recipes": 0, "linked": 0, "links": 0, "unlinked": 0, "variable_target": 0, "rejected": 0}
    for record in records:
        if not isinstance(record, dict):
            counts["rejected"] += 1
            rejects.append({"source": source, "item": repr(record)[:80], "reason": "recipe is not a JSON object"})
            continue
        rid = recipe_id(record)
        if rid in seen:
            continue
        seen.add(rid)
        counts["recipes"] += 1
        formula = target_formula(record)
        reduced = reduced_formula(formula)
        mp_id = (record.get("target") or {}).get("mp_id")
        if formula is None and mp_id is None:
            counts["rejected"] += 1
            rejects.append({"source": source, "item": rid, "reason": "recipe names no target"})
            continue
        if reduced is None and mp_id not in ids:
            counts["variable_target"] += 1
            continue
        if mp_id in ids:
            targets = [(mp_id, "mp_id")]
        else:
            targets = [(mid, "formula") for mid in by_formula.get(reduced, [])]
        if not targets:
            counts["unlinked"] += 1
            continue
        counts["linked"] += 1
        for mid, method in targets:
            rows.append(
                {
                    "recipe_id": rid,
                    "material_id": mid,
                    "link_method": method,
                    "doi": record.get("doi"),
                    "synthesis_type": record.get("synthesis_type"),
                    "target_formula": formula,
                    "reaction_string": record.get("reaction_string"),
                    "paragraph_string": record.get("paragraph_string"),
                    "precursors": precursor_formulas(record),
                    "record": json.dumps(record, default=str),
                }
            )
    counts["links"] = len(rows)
    links = conform_synthesis(pd.DataFrame(rows)) if rows else empty_synthesis()
    return links, counts, rejects
