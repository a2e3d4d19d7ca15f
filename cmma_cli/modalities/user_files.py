"""A user's own files (``cmma embed --input``, ``cmma retrieve``): what the modalities' readers share.

Suffixes (``.gz`` / ``.xz`` looked through), tables (CSV, TSV, Parquet) and their columns, and the
``"a, b or c"`` lists the sentences about them use. The modalities decide which files are theirs
(:meth:`~cmma_cli.modalities.base.Modality.claim_input`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from cmma_cli.errors import CMMAError

#: Tables a user may give (read with pandas).
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")
#: Columns that name a row of a user's table or JSON object, first found wins.
ID_COLUMNS = ("material_id", "mp_id", "id", "name")


def suffix(path: Path) -> str:
    """The file's type suffix, lower case, looking through ``.gz`` / ``.xz`` (``a.json.xz`` -> ``.json``)."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in (".gz", ".xz"):
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def pick(columns: Iterable[Any], candidates: tuple[str, ...]) -> Any:
    """The first of ``candidates`` among ``columns`` (case-insensitive), as the column is spelled, or None."""
    lower = {str(c).lower(): c for c in columns}
    return next((lower[c] for c in candidates if c in lower), None)


def _table_error(path: Path, exc: Exception) -> CMMAError:
    return CMMAError(f"Could not read the table {path} ({type(exc).__name__}): check that it is a valid CSV or "
                     "Parquet file.")


def read_table(path: Path):
    """A user's CSV / TSV / Parquet table as a DataFrame, or one sentence saying it cannot be read."""
    import pandas as pd

    try:
        if suffix(path) in (".parquet", ".pq"):
            return pd.read_parquet(path)
        return pd.read_csv(path, sep="\t" if suffix(path) == ".tsv" else ",")
    except Exception as exc:
        raise _table_error(path, exc) from None


@lru_cache(maxsize=256)
def _columns(path: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    import pandas as pd
    import pyarrow.parquet as pq

    try:
        if suffix(Path(path)) in (".parquet", ".pq"):
            return tuple(pq.read_schema(path).names)
        return tuple(str(c) for c in pd.read_csv(path, sep="\t" if suffix(Path(path)) == ".tsv" else ",", nrows=0).columns)
    except Exception as exc:
        raise _table_error(Path(path), exc) from None


def table_columns(path: Path) -> tuple[str, ...]:
    """The column names of a user's table (read once per version of the file)."""
    stat = Path(path).stat()
    return _columns(str(path), stat.st_mtime_ns, stat.st_size)


def is_table(path: Path) -> bool:
    """Whether ``path`` is a table by its suffix."""
    return suffix(path) in TABLE_SUFFIXES


def join_or(items: Iterable[str]) -> str:
    """``a, b or c``."""
    items = [i for i in items if i]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1] if items else ""
