"""A user's own texts (``cmma embed --input``), cleaned exactly as ``cmma preprocess`` cleans texts.

- a CSV / Parquet table with a text column (:data:`TEXT_COLUMNS`) and no CIF column: one text per row,
  id from an id column (else ``<stem>-<row>``);
- a JSON / JSON-lines file of strings, of ``{"id", "text"}`` objects, or of synthesis recipes (composed
  into one procedure text, as preprocess composes them), id from the object (else ``<stem>-<i>``);
- a ``.txt`` / ``.md`` prose file: one text, id = the file stem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cmma_cli.errors import CMMAError
from cmma_cli.modalities.user_files import ID_COLUMNS, is_table, pick, read_table, suffix, table_columns

#: JSON files of texts or recipes.
JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")
#: Prose files: one text each (unless the file is something more specific, e.g. a two-column pattern).
PROSE_SUFFIXES = (".txt", ".md")
#: Columns of a user's table (or keys of a JSON object) that hold a text.
TEXT_COLUMNS = ("text", "description", "procedure", "synthesis", "synthesis_text")


def claim(path: Path) -> int:
    """2 for JSON files and tables with a text column, 1 for prose files (a fallback), else 0."""
    kind = suffix(path)
    if kind in JSON_SUFFIXES:
        return 2
    if is_table(path):
        return 2 if pick(table_columns(path), TEXT_COLUMNS) is not None else 0
    return 1 if kind in PROSE_SUFFIXES else 0


def _record(record: Any, default_id: str) -> tuple[str, str] | None:
    """``(id, clean text)`` from a JSON item: a string, ``{"id", "text"}``, or a synthesis recipe."""
    from cmma_cli.preprocess.text import compose_procedure, normalize_text

    if isinstance(record, str):
        return default_id, normalize_text(record)
    if not isinstance(record, dict):
        return None
    mid = next((str(record[k]) for k in ID_COLUMNS if record.get(k) not in (None, "")), default_id)
    text_key = next((k for k in TEXT_COLUMNS if isinstance(record.get(k), str)), None)
    if text_key is not None:
        return mid, normalize_text(record[text_key])
    if record.get("operations") is not None or record.get("precursors") is not None or record.get("target") is not None:
        from cmma_cli.sources.recipes import recipe_id

        rid = next((str(record[k]) for k in ID_COLUMNS if record.get(k) not in (None, "")), recipe_id(record))
        return rid, compose_procedure(record, record.get("synthesis_type"))
    return None


def _json(path: Path, source: str, texts: list, rejects: list) -> None:
    from cmma_cli.sources.recipes import read_recipe_file

    try:
        records = read_recipe_file(path)
    except (OSError, ValueError, EOFError) as exc:
        raise CMMAError(f"Could not read {path} ({exc}): give a JSON list, JSON lines, or {{\"reactions\": [...]}}.") from None
    for i, record in enumerate(records):
        item = _record(record, f"{path.name.split('.')[0]}-{i}")
        if item is None or not item[1]:
            rejects.append({"source": source, "item": f"{path}:{i}", "reason": "no text, id/text object or recipe"})
        else:
            texts.append((item[0], item[1], str(path)))


def _table(path: Path, source: str, texts: list, rejects: list) -> None:
    import pandas as pd

    from cmma_cli.preprocess.text import normalize_text

    frame = read_table(path)
    text_col = pick(frame.columns, TEXT_COLUMNS)
    id_col = pick(frame.columns, ID_COLUMNS)
    for i, row in enumerate(frame.to_dict("records")):
        text = row[text_col]
        mid = str(row[id_col]) if id_col is not None and pd.notna(row[id_col]) else f"{path.stem}-{i}"
        clean = normalize_text(text) if isinstance(text, str) else ""
        if clean:
            texts.append((mid, clean, str(path)))
        else:
            rejects.append({"source": source, "item": f"{path}:{i}", "reason": "empty text"})


def read_texts(paths: list[Path], source: str) -> tuple[list[tuple[str, str, str]], list[dict[str, str]]]:
    """``(id, clean text, file)`` of every text in ``paths`` (in order), and the rejects (``source``: their source)."""
    from cmma_cli.preprocess.text import normalize_text

    texts: list[tuple[str, str, str]] = []
    rejects: list[dict[str, str]] = []
    for path in paths:
        kind = suffix(path)
        if kind in JSON_SUFFIXES:
            _json(path, source, texts, rejects)
        elif is_table(path):
            _table(path, source, texts, rejects)
        else:
            text = normalize_text(path.read_text(errors="replace"))
            if text:
                texts.append((path.stem, text, str(path)))
            else:
                rejects.append({"source": source, "item": str(path), "reason": "empty text file"})
    return texts, rejects
