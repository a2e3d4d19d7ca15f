"""The raw schema: what every source (Materials Project, local files, the built-in sample) yields.

Three tables, one row per material / recipe link / description, keyed by ``material_id``:

``materials``
    ``material_id`` (str), ``formula`` (reduced formula, str), ``elements`` (sorted list of str),
    ``nsites`` (int), ``structure`` (the pymatgen ``Structure`` as JSON, str), ``source`` (str:
    ``mp``, ``local:<file>``, ``sample:<collection>``), then the known property columns below
    (nullable; a missing value is a null, never a fake one), then any further numeric properties a
    local table carried (kept under their own names, listed in the fetch manifest's ``properties``).

``synthesis``
    One row per (recipe, material) link: ``recipe_id``, ``material_id``, ``link_method`` (``mp_id``:
    the recipe names this material id; ``formula``: the recipe's target has this material's reduced
    formula), ``doi``, ``synthesis_type``, ``target_formula``, ``reaction_string``,
    ``paragraph_string``, ``precursors`` (list of formulas) and ``record`` (the whole recipe, JSON, in
    the Materials Project / text-mined layout, so later stages can compose the procedure faithfully).

``descriptions``
    ``material_id``, ``description`` (natural-language structure description), ``source`` (e.g.
    ``robocrys``).

``rejects``
    Inputs that could not be used: ``source``, ``item`` (file name, row, recipe id), ``reason``.

:func:`conform_materials` and friends put any source's frame into exactly this shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

#: The raw column holding each material's structure (pymatgen JSON); also the reject source of one that cannot be read.
STRUCTURE_COLUMN = "structure"
#: Identity and structure columns, in order.
MATERIAL_COLUMNS = ["material_id", "formula", "elements", "nsites", STRUCTURE_COLUMN, "source"]

#: Properties later stages know by name, with their pandas dtypes. Units: eV/atom for energies,
#: eV for the band gap, g/cm^3 for density, GPa for moduli.
KNOWN_PROPERTIES: dict[str, str] = {
    "formation_energy_per_atom": "Float64",
    "band_gap": "Float64",
    "energy_above_hull": "Float64",
    "is_stable": "boolean",
    "is_metal": "boolean",
    "density": "Float64",
    "crystal_system": "string",
    "spacegroup_number": "Int64",
    "spacegroup_symbol": "string",
    "bulk_modulus_vrh": "Float64",
    "shear_modulus_vrh": "Float64",
}

#: Other names the same properties go by in tables users bring (MP-20, CDVAE, MP summary docs).
PROPERTY_ALIASES: dict[str, str] = {
    "e_above_hull": "energy_above_hull",
    "energy_above_hull_per_atom": "energy_above_hull",
    "formation_energy": "formation_energy_per_atom",
    "e_form": "formation_energy_per_atom",
    "gap": "band_gap",
    "spacegroup.number": "spacegroup_number",
    "spacegroup": "spacegroup_number",
    "space_group": "spacegroup_number",
    "symmetry.number": "spacegroup_number",
    "symmetry.symbol": "spacegroup_symbol",
    "symmetry.crystal_system": "crystal_system",
    "k_vrh": "bulk_modulus_vrh",
    "g_vrh": "shear_modulus_vrh",
}

SYNTHESIS_COLUMNS = [
    "recipe_id",
    "material_id",
    "link_method",
    "doi",
    "synthesis_type",
    "target_formula",
    "reaction_string",
    "paragraph_string",
    "precursors",
    "record",
]
DESCRIPTION_COLUMNS = ["material_id", "description", "source"]
REJECT_COLUMNS = ["source", "item", "reason"]


def conform_materials(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Return ``df`` in the raw materials schema and the names of its extra property columns.

    Known properties missing from ``df`` become null columns; aliases are renamed; extra columns are
    kept only when numeric or boolean (text columns such as a CIF or a formula string are dropped).
    """
    df = df.rename(columns={k: v for k, v in PROPERTY_ALIASES.items() if k in df and v not in df})
    missing = [c for c in MATERIAL_COLUMNS if c not in df]
    if missing:
        raise ValueError(f"raw materials frame lacks {missing}")
    out = df[MATERIAL_COLUMNS].copy()
    out["material_id"] = out["material_id"].astype(str)
    out["nsites"] = out["nsites"].astype("int64")
    out["elements"] = out["elements"].map(lambda e: sorted(str(x) for x in e))
    for name, dtype in KNOWN_PROPERTIES.items():
        col = df[name] if name in df else pd.Series([None] * len(df), index=df.index)
        out[name] = _as_dtype(col, dtype)
    extra = []
    for name in df.columns:
        if name in out.columns or name in PROPERTY_ALIASES:
            continue
        col = df[name]
        if pd.api.types.is_bool_dtype(col) or pd.api.types.is_numeric_dtype(col):
            out[name] = col.astype("boolean") if pd.api.types.is_bool_dtype(col) else col.astype("Float64")
            extra.append(name)
    return out.reset_index(drop=True), extra


def clear_non_finite(materials: pd.DataFrame) -> dict[str, int]:
    """Make every infinite value of a numeric property column missing (in place): ``inf`` in a user's CSV is no
    measurement. Returns ``{column: how many}`` for the columns that had some."""
    counts: dict[str, int] = {}
    for name in materials.columns:
        col = materials[name]
        if name in MATERIAL_COLUMNS or not pd.api.types.is_float_dtype(col):
            continue
        values = col.to_numpy(dtype=float, na_value=np.nan)
        bad = np.isinf(values)
        if bad.any():
            materials[name] = col.mask(bad)
            counts[name] = int(bad.sum())
    return counts


def _as_dtype(col: pd.Series, dtype: str) -> pd.Series:
    if dtype == "Float64":
        return pd.to_numeric(col, errors="coerce").astype("Float64")
    if dtype == "Int64":
        return pd.to_numeric(col, errors="coerce").round().astype("Int64")
    if dtype == "boolean":
        return col.map(_as_bool).astype("boolean")
    return col.map(lambda v: None if _is_null(v) else str(v)).astype("string")


def _is_null(v: Any) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA


def _as_bool(v: Any) -> Any:
    if _is_null(v):
        return None
    if isinstance(v, str):
        return v.strip().lower() in {"true", "1", "yes"}
    return bool(v)


def conform_synthesis(df: pd.DataFrame) -> pd.DataFrame:
    """Return recipe links in the raw synthesis schema (empty frame with the right columns if none)."""
    if df.empty:
        return empty_synthesis()
    out = df[SYNTHESIS_COLUMNS].copy()
    for c in ("recipe_id", "material_id", "link_method"):
        out[c] = out[c].astype(str)
    out["precursors"] = out["precursors"].map(lambda p: [str(x) for x in (p if p is not None else [])])
    out["record"] = out["record"].map(lambda r: r if isinstance(r, str) else json.dumps(r, default=str))
    return out.reset_index(drop=True)


def empty_synthesis() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in SYNTHESIS_COLUMNS})


def conform_descriptions(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in DESCRIPTION_COLUMNS})
    return df[DESCRIPTION_COLUMNS].astype(str).reset_index(drop=True)


def rejects_frame(rows: list[dict[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=REJECT_COLUMNS).astype(str)


@dataclass
class RawData:
    """What a source yields: the three raw tables (already conformed), rejects, extra property names, and
    counts worth reporting (e.g. how many recipes were read, linked, or had no fixed target composition)."""

    materials: pd.DataFrame
    synthesis: pd.DataFrame = field(default_factory=empty_synthesis)
    descriptions: pd.DataFrame = field(default_factory=lambda: conform_descriptions(pd.DataFrame()))
    rejects: list[dict[str, str]] = field(default_factory=list)
    extra_properties: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    #: every recipe read (raw/recipes.parquet), linked or not; None when the source read no recipe file
    recipes: pd.DataFrame | None = None
