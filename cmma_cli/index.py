"""FAISS indexes over L2-normalised embeddings: build, save beside their Parquet table, load, search.

Row ``i`` of an index is row ``i`` of the Parquet table it was built from; that table is the id mapping.
On normalised vectors the inner product is the cosine similarity, so scores lie in [-1, 1]. Two kinds:

- ``flat`` (default): exact search, ``IndexFlatIP``; right up to a few million vectors.
- ``ivf``: approximate, ``IndexIVFFlat`` with inner product: the vectors are clustered into ``nlist``
  cells (k-means; at most one per 39 vectors, so a small table gets fewer) and a query scans only the
  ``nprobe`` nearest cells. For millions of materials;
  the benchmark (``benchmarks/retrieve.py``) reports its recall against the exact search.

:func:`brute_force` is the plain numpy search both are checked against.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cmma_cli.errors import CMMAError

INDEX_KINDS = ("flat", "ivf")
#: faiss wants at least this many training vectors per IVF cell.
POINTS_PER_CELL = 39


def _faiss():
    import faiss  # imported late: ``cmma --help`` should not pay for it

    return faiss


def auto_nlist(n: int) -> int:
    """The default number of IVF cells for ``n`` vectors: about 4 sqrt(n), with 39+ vectors per cell."""
    return max(1, min(int(4 * math.sqrt(n)), n // POINTS_PER_CELL))


def build_index(vectors: np.ndarray, kind: str = "flat", nlist: int | None = None, nprobe: int = 16):
    """An inner-product index holding ``vectors`` (rows already L2-normalised, float32) in row order."""
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    if kind not in INDEX_KINDS:
        raise CMMAError(f"--index must be one of {', '.join(INDEX_KINDS)}, not {kind!r}.")
    if (nlist is not None and nlist < 1) or nprobe < 1:
        raise CMMAError(f"--nlist and --nprobe must be at least 1, not {nlist} and {nprobe}.")
    if kind == "flat" or n == 0:  # an empty table has nothing to cluster
        index = faiss.IndexFlatIP(d)
    else:  # no more cells than the vectors can fill (a small table gets fewer than asked)
        cells = max(1, min(nlist or auto_nlist(n), n // POINTS_PER_CELL))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, cells, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(nprobe, cells)
    if n:
        index.add(vectors)
    return index


def save_index(index, path: Path) -> Path:
    """Write ``index`` to ``path`` atomically (temporary name, then rename)."""
    from cmma_cli.workspace import atomic

    faiss = _faiss()
    with atomic(path) as tmp:
        faiss.write_index(index, str(tmp))
    return Path(path)


def load_index(path: Path):
    """An index written by :func:`save_index`."""
    return _faiss().read_index(str(path))


def search(index, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, rows)``, each ``(queries, k)``, best first; ``allowed`` (bool per row) restricts the rows searched.

    Where fewer than ``k`` rows qualify, the missing places hold row ``-1`` (callers drop them).
    """
    faiss = _faiss()
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    k = max(1, min(int(k), index.ntotal)) if index.ntotal else 1
    if allowed is None:
        return index.search(queries, k)
    bits = np.packbits(np.asarray(allowed, dtype=bool), bitorder="little")
    selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bits))
    ivf = _ivf(index)
    if ivf is not None:
        params = faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe)
    else:
        params = faiss.SearchParameters(sel=selector)
    scores, rows = index.search(queries, k, params=params)
    del bits  # kept alive until here: the selector points into it
    return scores, rows


def _ivf(index):
    try:
        return _faiss().extract_index_ivf(index)
    except RuntimeError:  # not an IVF index
        return None


def describe(index) -> dict:
    """What a manifest records about an index."""
    ivf = _ivf(index)
    if ivf is None:
        return {"kind": "flat", "vectors": int(index.ntotal)}
    return {"kind": "ivf", "vectors": int(index.ntotal), "nlist": int(ivf.nlist), "nprobe": int(ivf.nprobe)}


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact top ``k`` by inner product in plain numpy (``argpartition`` then a sort of the ``k``)."""
    queries = np.atleast_2d(queries)
    k = min(k, vectors.shape[0])
    scores = queries @ vectors.T
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.argsort(-top_scores, axis=1, kind="stable")
    return np.take_along_axis(top_scores, order, axis=1), np.take_along_axis(top, order, axis=1)
