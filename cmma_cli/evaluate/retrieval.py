"""Cross-modal retrieval on the test split, for every ordered pair of modalities.

For a pair (a -> b), every test material that has both is a query (its ``a`` embedding) and a
gallery item (its ``b`` embedding); the query's own material is its match. Recall@K, MRR and the
mean / median rank count that exact match; mAP also counts every other gallery material of the same
composition group (polymorphs), since a composition-level hit is what a user searching by pattern or
text usually wants. Each figure sits beside its expectation under a random ranking, and Recall@K and MRR
carry a bootstrap standard error over the test queries (``recall@K_se``, ``mrr_se``: cheap, the ranks are
resampled, not recomputed).
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


#: Bootstrap resamples of the test queries behind each ± (over ranks already computed: milliseconds).
BOOTSTRAP_RESAMPLES = 1000


def bootstrap_se(ranks: np.ndarray, ks: tuple[int, ...], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
                 ) -> dict[str, float]:
    """Standard errors of Recall@K and MRR over ``resamples`` bootstrap resamples of the queries (``ranks``)."""
    ranks = np.asarray(ranks, dtype=float)
    rng = np.random.default_rng(seed)
    picks = ranks[rng.integers(0, len(ranks), size=(resamples, len(ranks)))]
    out = {f"recall@{k}_se": float(np.std((picks <= k).mean(axis=1), ddof=1)) for k in ks}
    out["mrr_se"] = float(np.std((1.0 / picks).mean(axis=1), ddof=1))
    return out


def retrieval_pair(data: EvalData, a: str, b: str, ks: tuple[int, ...] = (1, 5, 10), split: str = "test",
                   seed: int = 0) -> dict[str, Any] | None:
    """Scores of retrieving ``b`` from ``a`` on ``split``; None when fewer than two materials have both."""
    ids = pair_ids(data, a, b, split)
    if len(ids) < 2:
        return None
    qa = data.tables[a].vectors[data.tables[a].rows_of(ids)]
    gb = data.tables[b].vectors[data.tables[b].rows_of(ids)]
    sim = qa @ gb.T
    groups = data.materials.set_index("material_id").loc[list(ids), "group"].to_numpy()
    same_group = groups[:, None] == groups[None, :]
    scores = M.retrieval_scores(sim, np.arange(len(ids)), ks, relevant_for_map=same_group)
    ranks = M.first_relevant_ranks(sim, np.eye(len(ids), dtype=bool))
    return {**scores, **bootstrap_se(ranks, ks, seed=seed)}


def run_retrieval(data: EvalData, ks: tuple[int, ...] = (1, 5, 10), split: str = "test", seed: int = 0
                  ) -> dict[str, Any]:
    """``{"a->b": scores}`` for every ordered pair of modalities; pairs with too few test materials are listed apart."""
    out: dict[str, Any] = {"pairs": {}, "skipped": [], "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": seed}}
    for a, b in permutations(data.modalities, 2):
        scores = retrieval_pair(data, a, b, ks, split, seed)
        if scores is None:
            out["skipped"].append({"pair": f"{a}->{b}", "reason": f"fewer than 2 {split} materials have both"})
        else:
            out["pairs"][f"{a}->{b}"] = scores
    return out
