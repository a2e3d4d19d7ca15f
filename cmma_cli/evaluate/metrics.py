"""Evaluation metrics as plain numpy functions (no model, no I/O): regression, classification, ranking.

Ranking functions take a similarity matrix ``sim`` (queries x gallery, higher = more similar) and a
boolean relevance matrix of the same shape. Ties in similarity are broken pessimistically (a relevant
item tied with irrelevant ones ranks after them), so a constant scorer never looks better than chance.
"""

from __future__ import annotations

import math

import numpy as np

# ------------------------------------------------------------------------------------------ regression


def mae(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean absolute error."""
    y, pred = np.asarray(y, float), np.asarray(pred, float)
    return float(np.mean(np.abs(y - pred)))


def rmse(y: np.ndarray, pred: np.ndarray) -> float:
    """Root mean squared error."""
    y, pred = np.asarray(y, float), np.asarray(pred, float)
    return float(np.sqrt(np.mean((y - pred) ** 2)))


def r2(y: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination 1 - SS_res / SS_tot (NaN when ``y`` is constant)."""
    y, pred = np.asarray(y, float), np.asarray(pred, float)
    total = float(np.sum((y - y.mean()) ** 2))
    if total == 0.0:
        return float("nan")
    return 1.0 - float(np.sum((y - pred) ** 2)) / total


def regression_scores(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """``{mae, rmse, r2, n}`` of predictions ``pred`` of ``y``."""
    return {"mae": mae(y, pred), "rmse": rmse(y, pred), "r2": r2(y, pred), "n": int(len(y))}


# -------------------------------------------------------------------------------------- classification


def accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Share of correct labels."""
    return float(np.mean(np.asarray(y) == np.asarray(pred)))


def macro_f1(y: np.ndarray, pred: np.ndarray, labels: list | None = None) -> float:
    """Unweighted mean over ``labels`` (default: those in ``y`` or ``pred``) of each class's F1 (0 where undefined)."""
    y, pred = np.asarray(y), np.asarray(pred)
    labels = sorted(set(y.tolist()) | set(pred.tolist())) if labels is None else labels
    scores = []
    for c in labels:
        tp = float(np.sum((y == c) & (pred == c)))
        fp = float(np.sum((y != c) & (pred == c)))
        fn = float(np.sum((y == c) & (pred != c)))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else float("nan")


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` (ascending), ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=float)
    start = 0
    while start < len(x):
        stop = start + 1
        while stop < len(x) and sorted_x[stop] == sorted_x[start]:
            stop += 1
        ranks[order[start:stop]] = (start + stop + 1) / 2.0
        start = stop
    return ranks


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve of binary labels ``y`` (1 = positive) by ``score``; ties count one half.

    Equal to the probability that a random positive scores above a random negative (Mann-Whitney U).
    NaN when ``y`` has only one class.
    """
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, dtype=float)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = _average_ranks(score)
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def macro_roc_auc(y: np.ndarray, proba: np.ndarray, classes: list) -> float:
    """One-vs-rest ROC AUC averaged over the classes of ``classes`` that ``y`` has both in and out of.

    ``proba[:, j]`` is the score of ``classes[j]``. NaN when no class qualifies.
    """
    y = np.asarray(y)
    aucs = [roc_auc(y == c, proba[:, j]) for j, c in enumerate(classes)]
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


# --------------------------------------------------------------------------------------------- ranking


def first_relevant_ranks(sim: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """(queries,) 1-based rank of each query's best-ranked relevant item (pessimistic ties).

    Every query must have at least one relevant item.
    """
    sim = np.asarray(sim, dtype=float)
    relevant = np.asarray(relevant, dtype=bool)
    if not relevant.any(axis=1).all():
        raise ValueError("every query needs at least one relevant gallery item")
    best = np.where(relevant, sim, -np.inf).max(axis=1)
    # items strictly better than the best relevant one, plus irrelevant items tied with it
    above = (sim > best[:, None]).sum(axis=1)
    tied = ((sim == best[:, None]) & ~relevant).sum(axis=1)
    return above + tied + 1


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """Share of queries whose first relevant item is in the top ``k``."""
    return float(np.mean(np.asarray(ranks) <= k))


def mean_reciprocal_rank(ranks: np.ndarray) -> float:
    """Mean of 1 / rank of the first relevant item."""
    return float(np.mean(1.0 / np.asarray(ranks, dtype=float)))


def average_precision(sim_row: np.ndarray, relevant_row: np.ndarray) -> float:
    """Average precision of one query: mean over its relevant items of the precision at their rank.

    Items are ordered by decreasing similarity; among equal similarities irrelevant items come first.
    """
    sim_row = np.asarray(sim_row, dtype=float)
    relevant_row = np.asarray(relevant_row, dtype=bool)
    if not relevant_row.any():
        raise ValueError("a query needs at least one relevant gallery item")
    order = np.lexsort((relevant_row, -sim_row))  # by -sim, then irrelevant (False) before relevant
    hits = relevant_row[order]
    positions = np.flatnonzero(hits) + 1
    return float(np.mean(np.arange(1, len(positions) + 1) / positions))


def mean_average_precision(sim: np.ndarray, relevant: np.ndarray) -> float:
    """Mean over queries of :func:`average_precision`."""
    return float(np.mean([average_precision(s, r) for s, r in zip(sim, relevant)]))


def harmonic(n: int) -> float:
    """The harmonic number H_n = 1 + 1/2 + ... + 1/n."""
    return float(np.sum(1.0 / np.arange(1, n + 1))) if n > 0 else 0.0


def chance_recall_at_k(n: int, r: int, k: int) -> float:
    """Probability that a random ranking of ``n`` items puts one of ``r`` relevant ones in the top ``k``."""
    k = min(k, n)
    if n - r < k:
        return 1.0
    # 1 - C(n - r, k) / C(n, k), as a product to stay finite
    miss = 1.0
    for i in range(k):
        miss *= (n - r - i) / (n - i)
    return 1.0 - miss


def chance_first_rank(n: int, r: int) -> float:
    """Expected rank of the first of ``r`` relevant items among ``n`` randomly ordered ones: (n + 1) / (r + 1)."""
    return (n + 1) / (r + 1)


def chance_reciprocal_rank(n: int, r: int) -> float:
    """Expected 1 / (rank of the first relevant item) under a random ranking of ``n`` items, ``r`` relevant."""
    # P(first relevant at position j) = C(n - j, r - 1) / C(n, r)
    total, p_none_before = 0.0, 1.0
    for j in range(1, n - r + 2):
        p_here = p_none_before * r / (n - j + 1)
        total += p_here / j
        p_none_before *= (n - j + 1 - r) / (n - j + 1)
    return total


def chance_average_precision(n: int, r: int) -> float:
    """Expected average precision of a random ranking of ``n`` items, ``r`` relevant.

    E[AP] = (1/n) * (H_n + (r - 1) / (n - 1) * (n - H_n)); equal to H_n / n when ``r`` is 1.
    """
    h = harmonic(n)
    if n == 1:
        return 1.0
    return (h + (r - 1) / (n - 1) * (n - h)) / n


def retrieval_scores(sim: np.ndarray, target: np.ndarray, ks: tuple[int, ...] = (1, 5, 10),
                     relevant_for_map: np.ndarray | None = None) -> dict[str, float]:
    """Recall@K, MRR, mAP, mean / median rank and their random-ranking expectations.

    ``target[i]`` is the gallery column of query ``i``'s own match (Recall, MRR and ranks use it);
    ``relevant_for_map`` (default: only that match) is the relevance mAP uses, e.g. every gallery
    item of the same composition.
    """
    sim = np.asarray(sim, dtype=float)
    nq, ng = sim.shape
    exact = np.zeros_like(sim, dtype=bool)
    exact[np.arange(nq), np.asarray(target)] = True
    relevant = exact if relevant_for_map is None else (np.asarray(relevant_for_map, bool) | exact)
    ranks = first_relevant_ranks(sim, exact)
    per_query_r = relevant.sum(axis=1)
    out: dict[str, float] = {"queries": int(nq), "gallery": int(ng)}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(ranks, k)
        out[f"chance_recall@{k}"] = chance_recall_at_k(ng, 1, k)
    out["mrr"] = mean_reciprocal_rank(ranks)
    out["chance_mrr"] = chance_reciprocal_rank(ng, 1)
    out["map"] = mean_average_precision(sim, relevant)
    out["chance_map"] = float(np.mean([chance_average_precision(ng, int(r)) for r in per_query_r]))
    out["mean_rank"] = float(np.mean(ranks))
    out["median_rank"] = float(np.median(ranks))
    out["chance_mean_rank"] = chance_first_rank(ng, 1)
    out["chance_median_rank"] = float(math.ceil((ng + 1) / 2))
    return out


# ------------------------------------------------------------------------------------------- latent


def neighbourhood_purity(x: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """Mean share of each point's ``k`` nearest neighbours (cosine, itself excluded) that share its label."""
    x = np.asarray(x, dtype=float)
    labels = np.asarray(labels)
    n = len(x)
    if n < 2:
        return float("nan")
    k = min(k, n - 1)
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    neighbours = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return float(np.mean(labels[neighbours] == labels[:, None]))


def chance_purity(labels: np.ndarray) -> float:
    """Expected :func:`neighbourhood_purity` of random neighbours: sum over classes of p_c * (n_c - 1) / (n - 1)."""
    labels = np.asarray(labels)
    n = len(labels)
    if n < 2:
        return float("nan")
    _, counts = np.unique(labels, return_counts=True)
    return float(np.sum(counts / n * (counts - 1) / (n - 1)))
