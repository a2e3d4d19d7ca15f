"""The embeddings artifact, ``<ws>/embeddings/<run>/``: its tables, and how their vectors are written and read.

What ``cmma embed`` writes and ``cmma retrieve`` / ``cmma evaluate`` read (the contract between them):

- ``<modality>.parquet`` for every modality of the run: ``material_id``, ``embedding`` (list<float32>,
  L2-normalised), one row per material that has the modality, plus any columns the modality adds
  (the text's ``text_source``);
- the extra tables the modalities declare (:attr:`~cmma_cli.modalities.base.Modality.embed_tables`), e.g.
  ``synthesis.parquet``: ``recipe_id``, ``material_id``, ``embedding`` of that recipe's procedure text;
- ``unified.parquet``: ``material_id``, ``embedding`` (normalised mean of the material's modality
  embeddings), ``modalities`` (list<str>, which went into it);
- ``<name>.faiss`` beside each table (row i of the index = row i of the table), and ``manifest.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cmma_cli.workspace import begin_stage, write_arrow

#: The table of every material's normalised mean over its modalities.
UNIFIED = "unified"


def tables() -> tuple[str, ...]:
    """Every table the stage may write, in the order it reports them: one per registered modality, the extra
    tables the modalities declare, then ``unified``."""
    from cmma_cli.modalities import REGISTRY

    extra = [t for m in REGISTRY.values() for t in m.embed_tables if t not in REGISTRY]
    return (*REGISTRY, *dict.fromkeys(extra), UNIFIED)


def extra_tables() -> dict[str, str]:
    """``{table: the column naming its rows}`` of the tables that are not one row per material (``synthesis``)."""
    from cmma_cli.modalities import REGISTRY

    return {t: key for m in REGISTRY.values() for t, key in m.embed_tables.items() if t not in REGISTRY}



def vector_column(vectors: np.ndarray, block: int = 1 << 20) -> pa.ChunkedArray:
    """``(n, d)`` float32 -> a list<float32> column (one list per row), built without a Python loop."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    chunks = []
    for start in range(0, n, block):  # blocks keep each chunk's int32 offsets in range
        part = vectors[start : start + block]
        offsets = pa.array(np.arange(0, (len(part) + 1) * d, d, dtype=np.int32))
        chunks.append(pa.ListArray.from_arrays(offsets, pa.array(part.reshape(-1))))
    return pa.chunked_array(chunks, type=pa.list_(pa.float32()))


def read_vectors(path: Path, columns: list[str] | None = None) -> tuple[pa.Table, np.ndarray]:
    """An embeddings table (other columns) and its ``embedding`` column as an ``(n, d)`` float32 array."""
    table = pq.read_table(path, columns=None if columns is None else [*columns, "embedding"])
    column = table.column("embedding").combine_chunks()
    n = table.num_rows
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    vectors = flat.reshape(n, -1) if n else np.zeros((0, 0), dtype=np.float32)
    return table.drop_columns(["embedding"]), vectors


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def unify(ids: list[str], parts: dict[str, tuple[list[str], np.ndarray]]) -> tuple[list[str], np.ndarray, list[list[str]]]:
    """The normalised mean of each material's modality embeddings, in ``ids`` order (materials with none left out)."""
    position = {m: i for i, m in enumerate(ids)}
    dim = next((v.shape[1] for _, v in parts.values() if v.size), 0)
    total = np.zeros((len(ids), dim), dtype=np.float32)
    used: list[list[str]] = [[] for _ in ids]
    for modality, (part_ids, vectors) in parts.items():
        rows = np.fromiter((position[m] for m in part_ids), dtype=np.int64, count=len(part_ids))
        total[rows] += vectors  # ids are unique within a modality's table
        for r in rows:
            used[r].append(modality)
    keep = [i for i, u in enumerate(used) if u]
    return [ids[i] for i in keep], normalize(total[keep]), [used[i] for i in keep]


def clear_stage(out: Path) -> None:
    """Start ``out`` afresh: manifest first (so an interrupted run is not trusted), then the old tables."""
    begin_stage(out)
    for name in tables():
        for suffix in (".parquet", ".faiss"):
            (out / f"{name}{suffix}").unlink(missing_ok=True)


def write_embeddings(out: Path, name: str, columns: dict[str, Any], vectors: np.ndarray, cfg: Any) -> dict[str, Any]:
    """``<name>.parquet`` (``columns`` + ``embedding``) and ``<name>.faiss`` in ``out`` (``cfg``: the index kind,
    an :class:`~cmma_cli.config.EmbedConfig`); returns the index facts."""
    from cmma_cli.index import build_index, describe, save_index

    table = pa.table({**columns, "embedding": vector_column(vectors)})
    write_arrow(table, out / f"{name}.parquet")
    index = build_index(vectors, cfg.index, cfg.nlist, cfg.nprobe)
    save_index(index, out / f"{name}.faiss")
    return {"rows": table.num_rows, **describe(index)}


