"""Local files: structure tables, folders of CIFs, and synthesis recipe files.

``cmma fetch --source local PATH [PATH ...]`` accepts, in any mix:

- a CSV / TSV / Parquet table with a CIF column (``cif``, ``structure`` or ``cif_string``): an id column
  (``material_id``, ``mp_id`` or ``id``) names each row, else ``<file stem>-<row>``; every other numeric or
  boolean column is kept as a property (``e_above_hull`` and other common aliases map to the known names); a
  ``description`` column becomes the material's description;
- a folder of ``*.cif`` files (searched recursively; the file stem is the material id);
- a JSON / JSON-lines recipe file (optionally ``.gz`` / ``.xz``) in the Materials Project / text-mined
  layout: its recipes are linked to the structures given in the same call (see :mod:`cmma_cli.sources.recipes`).

Unparsable CIFs, duplicate ids and unusable recipes are skipped and reported as rejects.
"""

from __future__ import annotations

import lzma
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd

from cmma_cli.console import progress
from cmma_cli.errors import CMMAError
from cmma_cli.processes import die_with_starter
from cmma_cli.sources.recipes import link_recipes, read_recipe_file, recipe_table
from cmma_cli.sources.schema import MATERIAL_COLUMNS, PROPERTY_ALIASES, RawData, conform_descriptions, conform_materials
from cmma_cli.sources.structures import material_record, parse_cif

TABLE_SUFFIXES = {".csv", ".tsv", ".parquet", ".pq"}
RECIPE_SUFFIXES = {".json", ".jsonl", ".ndjson"}
CIF_COLUMNS = ("cif", "structure", "cif_string")
ID_COLUMNS = ("material_id", "mp_id", "id")
#: Columns of a user's table that the raw schema derives from the structure itself.
DERIVED_COLUMNS = set(MATERIAL_COLUMNS) | {"pretty_formula", "formula_pretty", "reduced_formula", "composition"}


def _kind(path: Path) -> str:
    if path.is_dir():
        return "cif_dir"
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in {".gz", ".xz"}:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in TABLE_SUFFIXES:
        return "table"
    if last in RECIPE_SUFFIXES:
        return "recipes"
    if last == ".cif":
        return "cif_file"
    raise CMMAError(
        f"Don't know how to read {path}: give a CSV/Parquet table with a CIF column, a folder of .cif files, "
        "or a JSON/JSON-lines file of synthesis recipes."
    )


def _read_table(path: Path) -> pd.DataFrame:
    name = path.name.lower()
    try:
        if ".parquet" in name or name.endswith(".pq"):
            return pd.read_parquet(path)
        return pd.read_csv(path, sep="\t" if ".tsv" in name else ",")
    except Exception as exc:
        raise CMMAError(f"Could not read the table {path} ({type(exc).__name__}: {exc}): check that it is a valid CSV or Parquet file.") from None


def _pick(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    lower = {c.lower(): c for c in columns}
    for cand in candidates:
        if cand in lower:
            return lower[cand]
    return None


def _build_row(args: tuple[str, str | Path, str, dict[str, Any]]) -> tuple[dict[str, Any] | None, str | None]:
    """(material_id, CIF text or .cif path, source, properties) -> (raw row, None) or (None, reason). Runs in workers."""
    material_id, cif, source, properties = args
    try:
        if isinstance(cif, Path):
            cif = cif.read_text(errors="replace")
        structure = parse_cif(cif)
    except (OSError, ValueError) as exc:
        return None, str(exc)
    return material_record(material_id, structure, source, **properties), None


def _table_items(path: Path) -> list[tuple[str, str, str, dict[str, Any]]]:
    df = _read_table(path)
    df = df.loc[:, [c for c in df.columns if not str(c).startswith("Unnamed:")]]
    cif_col = _pick(list(df.columns), CIF_COLUMNS)
    if cif_col is None:
        raise CMMAError(
            f"The table {path} has no CIF column: name the column holding CIF text one of {', '.join(CIF_COLUMNS)}."
        )
    id_col = _pick(list(df.columns), ID_COLUMNS)
    prop_cols = [c for c in df.columns if c not in {cif_col, id_col} and c not in DERIVED_COLUMNS]
    source = f"local:{path.name}"
    items = []
    for i, row in enumerate(df.to_dict("records")):
        mid = row[id_col] if id_col is not None and pd.notna(row[id_col]) else f"{path.stem}-{i}"
        props = {PROPERTY_ALIASES.get(c, c): (None if _isna(row[c]) else row[c]) for c in prop_cols}
        items.append((str(mid), row[cif_col], source, props))
    return items


def _isna(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # lists and arrays
        return False


def _cif_items(paths: list[Path], root: Path) -> list[tuple[str, Path, str, dict[str, Any]]]:
    return [(p.stem, p, f"local:{p.relative_to(root)}", {}) for p in paths]


def load_local(paths: list[str], workers: int | None = None) -> RawData:
    """Read local structure tables, CIF folders and recipe files into the raw schema."""
    if not paths:
        raise CMMAError("`cmma fetch --source local` needs at least one PATH: a CSV/Parquet table, a folder of CIFs, or a recipe file.")
    items: list[tuple[str, str | Path, str, dict[str, Any]]] = []
    recipe_files: list[Path] = []
    for raw_path in paths:
        path = Path(raw_path).expanduser()
        if not path.exists():
            raise CMMAError(f"{path} does not exist: check the path given to `cmma fetch --source local`.")
        kind = _kind(path)
        if kind == "table":
            items.extend(_table_items(path))
        elif kind == "cif_dir":
            cifs = sorted(p for p in path.rglob("*") if p.suffix.lower() == ".cif" and p.is_file())
            if not cifs:
                raise CMMAError(f"The folder {path} holds no .cif files: point to the folder that has them.")
            items.extend(_cif_items(cifs, path))
        elif kind == "cif_file":
            items.extend(_cif_items([path], path.parent))
        else:
            recipe_files.append(path)

    if not items:
        raise CMMAError("No structures given: add a table with a CIF column or a folder of .cif files to link recipes to.")

    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, str]] = []
    seen: set[str] = set()
    descriptions = []
    workers = workers or os.cpu_count() or 1
    with progress() as bar, ProcessPoolExecutor(max_workers=workers, initializer=die_with_starter) as pool:
        task = bar.add_task("Reading structures", total=len(items))
        for (mid, _, source, props), (row, reason) in zip(items, pool.map(_build_row, items, chunksize=32)):
            bar.advance(task)
            if row is None:
                rejects.append({"source": source, "item": mid, "reason": reason or "unknown"})
                continue
            if mid in seen:
                rejects.append({"source": source, "item": mid, "reason": "duplicate material_id (first one kept)"})
                continue
            seen.add(mid)
            text = row.pop("description", None)
            if isinstance(text, str) and text.strip():
                descriptions.append({"material_id": mid, "description": text.strip(), "source": source})
            rows.append(row)
    if not rows:
        raise CMMAError(f"None of the {len(items)} structures could be read (see the rejects): check the CIF text.")
    materials, extra = conform_materials(pd.DataFrame(rows))

    synthesis, every_recipe = [], []
    recipe_counts: dict[str, int] = {}
    for path in recipe_files:
        try:
            records = read_recipe_file(path)
        except (OSError, ValueError, EOFError, lzma.LZMAError, zlib.error) as exc:  # a corrupt .xz / .gz too
            what = str(exc) or type(exc).__name__
            raise CMMAError(f"Could not read recipes from {path} ({what}): give a JSON list, {{\"reactions\": [...]}} or "
                            "JSON lines (plain, .gz or .xz).") from None
        default_type = next((t for t in ("solid-state", "sol-gel", "precipitation", "hydrothermal") if t in path.name), None)
        for r in records:
            if isinstance(r, dict) and default_type and not r.get("synthesis_type"):
                r["synthesis_type"] = default_type
        every_recipe.append(recipe_table(records))
        links, counts, recipe_rejects = link_recipes(records, materials, source=f"local:{path.name}")
        rejects.extend(recipe_rejects)
        synthesis.append(links)
        for key, value in counts.items():
            recipe_counts[key] = recipe_counts.get(key, 0) + value
    synth = pd.concat(synthesis, ignore_index=True) if synthesis else None
    raw = RawData(materials=materials, rejects=rejects, extra_properties=extra, counts=recipe_counts)
    if synth is not None:
        raw.synthesis = synth.drop_duplicates(["recipe_id", "material_id"]).reset_index(drop=True)
    if every_recipe:
        raw.recipes = pd.concat(every_recipe, ignore_index=True).drop_duplicates("recipe_id").reset_index(drop=True)
    if descriptions:
        raw.descriptions = conform_descriptions(pd.DataFrame(descriptions))
    return raw
