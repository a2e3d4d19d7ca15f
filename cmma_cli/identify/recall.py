"""The recall stage of ``cmma identify``: which few hundred candidates are worth a physics fit.

Two recalls, each a ranking of every candidate for a pattern put on the workspace's XRD grid:

- **cosine**: the cosine similarity of the pattern with each candidate's computed pattern (no learning: what
  a scientist would do first);
- **learned**: the pattern through a trained run's XRD encoder, ranked by cosine similarity in the shared space
  with each material's embedded computed pattern (``embeddings/<run>/xrd.parquet``, the same encoder trained to
  ignore what measurements change: :mod:`~cmma_cli.modalities.xrd.augment`), or with its structure embedding
  (``structure.parquet``, the cross-modal search ``cmma retrieve --pattern`` does; measured in
  ``benchmarks/identify.py``, it recalls worse). Reference CIFs given with ``--references`` are not in those
  embeddings: the cosine recall alone proposes them.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from cmma_cli.errors import CMMAError
from cmma_cli.identify.candidates import Candidates
from cmma_cli.modalities.xrd import XRDModality
from cmma_cli.workspace import Workspace

#: The modality whose encoder reads the pattern, and whose embedding table the learned recall searches by default.
XRD = XRDModality.name

def cosine_scores(candidates: Candidates, query: np.ndarray) -> np.ndarray:
    """Cosine similarity of ``query`` (on the candidates' grid, unit norm) with every candidate's pattern."""
    return candidates.patterns @ query.astype(np.float32)


class LearnedRecall:
    """A trained run's XRD encoder and one of its embedding tables (``xrd`` or ``structure``), aligned to the
    candidates' rows."""

    def __init__(self, ws: Workspace, run: str | None, candidates: Candidates, table: str = XRD):
        from cmma_cli.retrieve import Retriever

        self.retriever = Retriever(ws, run)
        self.run, self.table = self.retriever.run, table
        if XRD not in self.retriever.modalities or table not in self.retriever.tables:
            raise CMMAError(f"Run {self.run!r} has no XRD encoder or no {table} embeddings: identify with --recall "
                            "cosine, or train and embed a run with the xrd modality.")
        ids, vectors = self.retriever.vectors(table)
        position = ids.get_indexer(candidates.ids)
        self.vectors = np.zeros((len(candidates), vectors.shape[1]), dtype=np.float32)
        self.present = position >= 0
        self.vectors[self.present] = vectors[position[self.present]]
        self.encoder = self.retriever.encoder()
        self.encoder.require(XRD, self.run)

    def embed(self, query: np.ndarray) -> np.ndarray:
        """The pattern (on the run's grid) in the shared space."""
        table = pa.table({"material_id": pa.array(["query"]),
                          XRD: pa.array([query.astype(np.float32)], pa.list_(pa.float32())),
                          "xrd_source": pa.array(["measured"])})
        _, vectors = self.encoder.embed_table(XRD, table)
        return vectors[0]

    def scores(self, query: np.ndarray) -> np.ndarray:
        """Cosine similarity of the encoded pattern with every candidate's embedding (-inf: none)."""
        out = self.vectors @ self.embed(query)
        return np.where(self.present, out, -np.inf)


def order(scores: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """The allowed rows, best score first (rows scored -inf left out)."""
    rows = np.flatnonzero(allowed & np.isfinite(scores))
    return rows[np.argsort(-scores[rows], kind="stable")]


def interleave(orders: list[np.ndarray], n: int) -> list[int]:
    """The first ``n`` distinct rows taking turns from each ranking."""
    out: dict[int, None] = {}
    depth = 0
    longest = max((len(o) for o in orders), default=0)
    while len(out) < n and depth < longest:
        for o in orders:
            if depth < len(o):
                out.setdefault(int(o[depth]), None)
        depth += 1
    return list(out)[:n]
