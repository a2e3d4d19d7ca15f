"""Synthesis match scored by hand on a small case: true pairs against random and hard (shared-element) negatives."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cmma_cli.evaluate.data import EvalData, Embeddings
from cmma_cli.evaluate.synthesis import run_synthesis, synthesis_match


def _data() -> EvalData:
    materials = pd.DataFrame({
        "material_id": ["A", "B", "C", "D"],
        "formula": ["Li2O", "LiFeO2", "NaCl", "KCl"],
        "elements": [["Li", "O"], ["Fe", "Li", "O"], ["Cl", "Na"], ["Cl", "K"]],
        "split": ["test", "test", "test", "train"],
        "group": ["Li2O", "LiFeO2", "NaCl", "KCl"],
    })
    eye = np.eye(4, dtype=np.float32)
    structure = Embeddings(np.array(["A", "B", "C", "D"], dtype=object), eye)
    # the text table holds the recipes' own texts: it must never score them
    text = Embeddings(np.array(["A", "C"], dtype=object), eye[[0, 2]])
    links = pd.DataFrame({"recipe_id": ["r1", "r2", "r3"], "material_id": ["A", "C", "D"]})
    recipes = np.array([[0.9, 0.4, 0.1, 0.0], [0.2, 0.5, 0.3, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=np.float32)
    return EvalData("hand", materials, {"unified": structure, "structure": structure, "text": text}, links, recipes,
                    {}, {}, [])


def test_synthesis_match_by_hand():
    s = synthesis_match(_data(), "structure")
    # sims r1: A .9 (true), B .4, C .1; r2: A .2, B .5, C .3 (true); r3 links a train material: left out
    assert (s["recipes"], s["materials"], s["true_pairs"]) == (2, 3, 2)
    assert s["random_negatives"] == 4 and s["hard_negatives"] == 1  # only (r1, B) shares Li/O with r1's target
    # true .9 beats all four negatives, true .3 beats .1 and .2: 6 of 8 pairs
    assert s["auc_random"] == pytest.approx(6 / 8)
    # hard: .9 > .4 but .3 < .4
    assert s["auc_hard"] == pytest.approx(1 / 2)
    assert s["recipe_to_material_recall@1"] == pytest.approx(1 / 2)
    assert s["chance_recall@1"] == pytest.approx(1 / 3)


def test_text_and_unified_never_score_recipes_and_no_recipes_is_said():
    data = _data()
    assert synthesis_match(data, "text") is None and synthesis_match(data, "unified") is None
    assert set(run_synthesis(data)["by_modality"]) == {"structure"}
    data.synthesis = None
    out = run_synthesis(data)
    assert out["by_modality"] == {} and "no synthesis recipes" in out["note"]
    del data.tables["text"]  # a structure + XRD run: nothing embeds the recipes, and the note says so
    assert "no text encoder to embed recipes with" in run_synthesis(data)["note"]
