"""Synthesis match / feasibility: does a recipe sit near the material it makes in the shared space?

Every recipe linked to a test material is scored against every test material by the cosine
similarity of the recipe's embedding (``synthesis.parquet``, written for the modality that declares that
table among its :attr:`~cmma_cli.modalities.base.Modality.embed_tables`) and the material's embedding of
one other modality (never that modality's own table or ``unified``, which contain the recipe texts
themselves: see :func:`leaky_tables`). True pairs are the recipe's own links; they are ranked against
(a) every mismatched pair ("random" negatives) and (b) the mismatched pairs whose material shares an
element with the recipe's target ("hard" negatives: the chemistry is plausible, the compound is not).
ROC AUC 0.5 is chance.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cmma_cli.evaluate import metrics as M
from cmma_cli.evaluate.data import SYNTHESIS, UNIFIED, EvalData


def recipe_modalities() -> list[str]:
    """The registered modalities whose encoder embeds the synthesis recipes: those that declare the recipe
    table (``synthesis``) among the embeddings tables ``cmma embed`` writes for them."""
    from cmma_cli.modalities import REGISTRY

    return [name for name, m in REGISTRY.items() if SYNTHESIS in m.embed_tables]


def leaky_tables() -> set[str]:
    """Embedding tables that must not score recipes: they are built from the recipe texts (the recipe
    modalities' own tables, and ``unified``, which averages them in)."""
    return {*recipe_modalities(), UNIFIED}


def recipe_pairs(data: EvalData, ids: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """The recipes linked to materials ``ids``, and two (recipes, materials) masks: ``true`` (the recipe's own links)
    and ``hard`` (mismatched pairs whose material shares an element with the recipe's target); None without links."""
    links = data.synthesis
    in_split = links["material_id"].isin(set(ids)).to_numpy()
    if not in_split.any():
        return None
    recipes = list(dict.fromkeys(links.loc[in_split, "recipe_id"]))
    col = {m: j for j, m in enumerate(ids)}
    row = {r: i for i, r in enumerate(recipes)}
    true = np.zeros((len(recipes), len(ids)), dtype=bool)
    for r, m in zip(links["recipe_id"], links["material_id"]):
        if m in col and r in row:
            true[row[r], col[m]] = True
    elements = data.materials.set_index("material_id").loc[list(ids), "elements"].map(lambda e: set() if e is None else {str(x) for x in e})
    elements = elements.to_numpy()
    target_elements = [set().union(*(elements[j] for j in np.flatnonzero(true[i]))) for i in range(len(recipes))]
    shares = np.array([[bool(target_elements[i] & elements[j]) for j in range(len(ids))] for i in range(len(recipes))])
    return recipes, true, shares & ~true


def match_scores(sim: np.ndarray, true: np.ndarray, hard: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict[str, Any]:
    """ROC AUCs of the true pairs of ``sim`` (recipes, materials) against every mismatched pair and against ``hard``
    ones, recipe -> material recall@k beside chance, and the mean similarities."""
    random_neg = ~true
    out: dict[str, Any] = {"recipes": int(sim.shape[0]), "materials": int(sim.shape[1]), "true_pairs": int(true.sum()),
                           "random_negatives": int(random_neg.sum()), "hard_negatives": int(hard.sum())}
    out["auc_random"] = _auc(sim, true, random_neg)
    out["auc_hard"] = _auc(sim, true, hard)
    ranks = M.first_relevant_ranks(sim, true)
    for k in ks:
        out[f"recipe_to_material_recall@{k}"] = M.recall_at_k(ranks, k)
        out[f"chance_recall@{k}"] = float(np.mean([M.chance_recall_at_k(sim.shape[1], int(r), k) for r in true.sum(1)]))
    out["true_similarity_mean"] = float(sim[true].mean())
    out["negative_similarity_mean"] = float(sim[random_neg].mean()) if random_neg.any() else float("nan")
    return out


def synthesis_match(data: EvalData, modality: str, split: str = "test", ks: tuple[int, ...] = (1, 5)) -> dict[str, Any] | None:
    """AUCs of true (recipe, material) pairs against random and hard negatives, with ``modality`` as the material side.

    ``split``: train | val | test, or ``all``. None when ``split`` has no recipe linked to a material with that modality.
    """
    if data.synthesis is None or modality in leaky_tables() or modality not in data.tables:
        return None
    emb = data.tables[modality]
    have = set(emb.ids)
    ids = np.array([m for m in data.split_ids(split) if m in have], dtype=object)
    if len(ids) < 2:
        return None
    pairs = recipe_pairs(data, ids)
    if pairs is None:
        return None
    recipes, true, hard = pairs
    first_row = {r: i for i, r in reversed(list(enumerate(data.synthesis["recipe_id"])))}
    R = data.synthesis_vectors[[first_row[r] for r in recipes]]
    X = emb.vectors[emb.rows_of(ids)]
    return match_scores(R @ X.T, true, hard, ks)


def _auc(sim: np.ndarray, true: np.ndarray, negatives: np.ndarray) -> float:
    if not negatives.any():
        return float("nan")
    scores = np.concatenate([sim[true], sim[negatives]])
    labels = np.concatenate([np.ones(int(true.sum()), bool), np.zeros(int(negatives.sum()), bool)])
    return M.roc_auc(labels, scores)


def run_synthesis(data: EvalData, split: str = "test") -> dict[str, Any]:
    """Synthesis-match scores for every modality that does not embed the recipes, or the reason there are none."""
    makers = recipe_modalities()
    if not any(m in data.tables for m in makers):  # recipes are embedded by one of the run's encoders
        names = " or ".join(makers) or "recipe"
        return {"by_modality": {}, "note": f"the run has no {names} encoder to embed recipes with: train with {names} "
                                           "among --modalities to score synthesis match"}
    if data.synthesis is None or data.synthesis.empty:
        return {"by_modality": {}, "note": "no synthesis recipes are linked to these materials"}
    out: dict[str, Any] = {"by_modality": {}}
    leaky = leaky_tables()
    for modality in data.modalities:
        if modality in leaky:
            continue
        scores = synthesis_match(data, modality, split)
        if scores is not None:
            out["by_modality"][modality] = scores
    if not out["by_modality"]:
        sides = [m for m in data.modalities if m not in leaky]
        out["note"] = f"no recipe is linked to a {split} material with {' or '.join(sides) or 'another'} embeddings"
    return out
