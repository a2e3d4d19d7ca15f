"""Every evaluation metric against a case worked out by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from cmma_cli.evaluate import metrics as M


def test_regression_metrics_by_hand():
    y, pred = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.5, 2.0, 2.0, 5.0])
    # errors 0.5, 0, -1, 1 -> |e| mean 2.5/4; e^2 mean 2.25/4; SS_tot = 5
    assert M.mae(y, pred) == pytest.approx(0.625)
    assert M.rmse(y, pred) == pytest.approx(math.sqrt(0.5625))
    assert M.r2(y, pred) == pytest.approx(1 - 2.25 / 5)
    assert M.r2(y, np.full(4, y.mean())) == pytest.approx(0.0)
    assert math.isnan(M.r2(np.ones(3), np.zeros(3)))
    assert M.regression_scores(y, y) == {"mae": 0.0, "rmse": 0.0, "r2": 1.0, "n": 4}


def test_classification_metrics_by_hand():
    y = np.array(["a", "a", "b", "b", "c"])
    pred = np.array(["a", "b", "b", "b", "a"])
    assert M.accuracy(y, pred) == pytest.approx(3 / 5)
    # F1: a: tp1 fp1 fn1 -> 0.5; b: tp2 fp1 fn0 -> 0.8; c: tp0 -> 0
    assert M.macro_f1(y, pred) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_roc_auc_by_hand_with_ties():
    y = np.array([1, 0, 1, 0])
    score = np.array([0.9, 0.8, 0.8, 0.1])
    # positive pairs: (0.9 > 0.8) 1, (0.9 > 0.1) 1, (0.8 = 0.8) 0.5, (0.8 > 0.1) 1 -> 3.5 / 4
    assert M.roc_auc(y, score) == pytest.approx(3.5 / 4)
    assert M.roc_auc(y, -score) == pytest.approx(0.5 / 4)
    assert M.roc_auc(np.array([1, 0]), np.array([0.3, 0.3])) == pytest.approx(0.5)
    assert math.isnan(M.roc_auc(np.array([1, 1]), np.array([0.1, 0.2])))
    # matches brute force over all positive-negative pairs on random data
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    s = rng.integers(0, 5, 50).astype(float)
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a, b in itertools.product(s[y == 1], s[y == 0])]
    assert M.roc_auc(y, s) == pytest.approx(np.mean(pairs))


def test_macro_roc_auc_skips_classes_absent_from_the_labels():
    y = np.array(["a", "a", "b"])
    proba = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.1, 0.9, 0.0]])
    # a vs rest: scores a=[0.9, 0.2], rest=[0.1] -> 1.0; b vs rest: b=[0.9], rest=[0.1, 0.8] -> 1.0; c absent
    assert M.macro_roc_auc(y, proba, ["a", "b", "c"]) == pytest.approx(1.0)


def test_ranking_metrics_by_hand():
    # three queries, four gallery items; the true match of query i is column i
    sim = np.array([
        [0.9, 0.1, 0.2, 0.3],   # match ranked 1
        [0.8, 0.5, 0.6, 0.1],   # match 0.5: below 0.8 and 0.6 -> rank 3
        [0.4, 0.4, 0.4, 0.0],   # match tied with two others: pessimistic rank 3
    ])
    ranks = M.first_relevant_ranks(sim, np.eye(3, 4, dtype=bool))
    assert ranks.tolist() == [1, 3, 3]
    assert M.recall_at_k(ranks, 1) == pytest.approx(1 / 3)
    assert M.recall_at_k(ranks, 3) == pytest.approx(1.0)
    assert M.mean_reciprocal_rank(ranks) == pytest.approx((1 + 1 / 3 + 1 / 3) / 3)
    scores = M.retrieval_scores(sim, np.arange(3), ks=(1, 5))
    assert scores["recall@1"] == pytest.approx(1 / 3) and scores["recall@5"] == 1.0
    assert scores["mean_rank"] == pytest.approx(7 / 3) and scores["median_rank"] == 3
    assert scores["map"] == pytest.approx(scores["mrr"])  # one relevant item each: AP = 1 / rank
    assert scores["chance_recall@1"] == pytest.approx(1 / 4) and scores["chance_recall@5"] == 1.0
    assert scores["chance_mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert scores["chance_mean_rank"] == pytest.approx(2.5)


def test_average_precision_by_hand():
    # ranking by similarity: items 0 (rel), 1 (not), 2 (rel), 3 (not), 4 (rel)
    sim = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    rel = np.array([True, False, True, False, True])
    assert M.average_precision(sim, rel) == pytest.approx((1 / 1 + 2 / 3 + 3 / 5) / 3)
    # map with extra relevant items: the composition-level relevance
    scores = M.retrieval_scores(sim[None, :], np.array([0]), ks=(1,), relevant_for_map=rel[None, :])
    assert scores["map"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3) and scores["mrr"] == 1.0


def test_chance_expectations_match_exhaustive_enumeration():
    n, r = 5, 2
    perms = list(itertools.permutations(range(n)))
    rel = np.array([True, True, False, False, False])
    firsts, aps, hits2 = [], [], []
    for p in perms:
        sim = -np.array(p, dtype=float)  # item p^-1 ... any ordering: item i has position p[i]
        firsts.append(M.first_relevant_ranks(sim[None, :], rel[None, :])[0])
        aps.append(M.average_precision(sim, rel))
    firsts = np.array(firsts)
    assert M.chance_first_rank(n, r) == pytest.approx(firsts.mean())
    assert M.chance_reciprocal_rank(n, r) == pytest.approx(np.mean(1 / firsts))
    assert M.chance_recall_at_k(n, r, 2) == pytest.approx(np.mean(firsts <= 2))
    assert M.chance_average_precision(n, r) == pytest.approx(np.mean(aps))
    assert M.chance_average_precision(4, 1) == pytest.approx(M.harmonic(4) / 4)


def test_neighbourhood_purity_by_hand():
    # two tight clusters of two, labels agree with the clusters except one point
    x = np.array([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]])
    assert M.neighbourhood_purity(x, np.array(["a", "a", "b", "b"]), k=1) == 1.0
    assert M.neighbourhood_purity(x, np.array(["a", "b", "b", "b"]), k=1) == pytest.approx(0.5)
    # chance: p_a * (n_a - 1)/(n - 1) + p_b * (n_b - 1)/(n - 1) = 0.25*0 + 0.75*(2/3)
    assert M.chance_purity(np.array(["a", "b", "b", "b"])) == pytest.approx(0.5)
