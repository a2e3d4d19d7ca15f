"""Cross-modal retrieval on the test split, for every ordered pair of modalities.

For a pair (a -> b), every test material that has both is a query (its ``a`` embedding) and a
gallery item (its ``b`` embedding); the query's own material is its match. Recall@K, MRR and the
mean / median rank count that exact match; mAP also counts every other gallery material of the same
composition group (polymorphs), since a composition-level hit is what a user searching by pattern or
text usually wants. Each figure sits beside its expectation under a random ranking.
"""

from __future__ import annotations

from itertools import permutations
from typing import Any

import numpy as np

from cmma_cli.evaluate import metrics as M
from cmma_cli.evaluate.data import EvalData


def pair_ids(data: EvalData, a: str, b: str, split: str = "test") -> np.ndarray:
    """Material ids of ``split`` that have both modality tables ``a`` and ``b``, in the processed order."""
    ids = data.split_ids(split)
    have_a, have_b = set(data.tables[a].ids), set(data.tables[b].ids)
    return np.array([m for m in ids if m in have_a and m in have_b], dtype=object)


def retrieval_pair(data: EvalData, a: str, b: str, ks: tuple[int, ...] = (1, 5, 10), split: str = "test"
                   ) -> dict[str, Any] | None:
    """Scores of retrieving ``b`` from ``a`` on ``split``; None when fewer than two materials have both."""
    ids = pair_ids(data, a, b, split)
    if len(ids) < 2:
        return None
    qa = data.tables[a].vectors[data.tables[a].rows_of(ids)]
    gb = data.tables[b].vectors[data.tables[b].rows_of(ids)]
    sim = qa @ gb.T
    groups = data.materials.set_index("material_id").loc[list(ids), "group"].to_numpy()
    same_group = groups[:, None] == groups[None, :]
    return M.retrieval_scores(sim, np.arange(len(ids)), ks, relevant_for_map=same_group)


def run_retrieval(data: EvalData, ks: tuple[int, ...] = (1, 5, 10), split: str = "test") -> dict[str, Any]:
    """``{"a->b": scores}`` for every ordered pair of modalities; pairs with too few test materials are listed apart."""
    out: dict[str, Any] = {"pairs": {}, "skipped": []}
    for a, b in permutations(data.modalities, 2):
        scores = retrieval_pair(data, a, b, ks, split)
        if scores is None:
            out["skipped"].append({"pair": f"{a}->{b}", "reason": f"fewer than 2 {split} materials have both"})
        else:
            out["pairs"][f"{a}->{b}"] = scores
    return out
