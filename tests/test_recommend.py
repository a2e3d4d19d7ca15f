"""`cmma recommend`: composition vectors, the popularity baseline and recommendations on real recipes, the
workspace path (every recipe kept by a local fetch), and the error sentences."""

from __future__ import annotations

import json
import lzma
from collections import Counter

import numpy as np
import pytest

from cmma_cli.composition import (ELEMENTS, ElementEmbeddings, formula_key, fraction_vector, material_fractions,
                                  parse_formula)
from cmma_cli.errors import CMMAError
from cmma_cli.recommend import RecipeBook, precursor_elements, recommend, score_recipe

RECIPES = "synthesis/solid-state_dataset_2019-12-03.json.xz"


@pytest.fixture(scope="module")
def records(shared_data):
    return json.load(lzma.open(shared_data / RECIPES))["reactions"]


def _has(record, *elements):
    els = set()
    for part in (record.get("target") or {}).get("composition") or []:
        els |= set(part.get("elements") or {})
    return any(e in els for e in elements)


@pytest.fixture(scope="module")
def li_book(records):
    """A real slice: every recipe whose target holds Li, Fe, Co or P."""
    return RecipeBook.from_records([r for r in records if _has(r, "Li", "Fe", "Co", "P")])


# --- composition -----------------------------------------------------------------------------------------------

def test_fraction_vector_ignores_order_and_scale():
    a = fraction_vector(parse_formula("LiFePO4"))
    assert a.shape == (len(ELEMENTS),) and abs(a.sum() - 1) < 1e-6
    np.testing.assert_allclose(a, fraction_vector(parse_formula("O4PFeLi")), atol=1e-7)
    np.testing.assert_allclose(a, fraction_vector(parse_formula("Li2Fe2P2O8")), atol=1e-7)
    np.testing.assert_allclose(a, fraction_vector({"O": 8, "P": 2, "Fe": 2, "Li": 2}), atol=1e-7)  # raw amounts
    assert a[ELEMENTS.index("O")] == pytest.approx(4 / 7)
    assert not np.allclose(a, fraction_vector(parse_formula("LiFePO3")))
    assert formula_key("NH4H2PO4") == formula_key("H6NO4P") and formula_key("Li2CO3") != formula_key("LiCO3")


def test_element_embedding_is_the_fraction_weighted_mean_and_scale_free():
    rng = np.random.default_rng(0)
    table = {el: rng.normal(size=8).tolist() for el in ELEMENTS}
    emb = ElementEmbeddings(table)
    v = emb.embed(parse_formula("LiFePO4"))
    np.testing.assert_allclose(v, emb.embed(parse_formula("P2O8Li2Fe2")), atol=1e-6)
    expected = (np.array(table["Li"]) + table["Fe"] + table["P"] + 4 * np.array(table["O"])) / 7
    np.testing.assert_allclose(v, expected / np.linalg.norm(expected), atol=1e-6)
    assert abs(np.linalg.norm(v) - 1) < 1e-6


def test_variable_targets_use_the_recipe_values_or_are_left_out():
    target = {"material_formula": "La1-xCaxMnO3", "amounts_vars": {"x": {"values": [0.3, 0.5]}},
              "composition": [{"elements": {"La": "1-x", "Ca": "x", "Mn": "1", "O": "3 - del_O"}, "amount": "1"}]}
    fr = material_fractions(target)
    assert fr == pytest.approx({"La": 0.7 / 5, "Ca": 0.3 / 5, "Mn": 1 / 5, "O": 3 / 5})
    target["amounts_vars"] = {"x": {"values": []}}
    assert material_fractions(target) is None
    book = RecipeBook.from_records([{"target": target, "precursors": [{"material_formula": "La2O3"}], "doi": "d"}])
    assert len(book) == 0 and book.counts["variable_target"] == 1


# --- the popularity baseline and recommendations on real recipes ------------------------------------------------

def test_popularity_baseline_is_each_elements_most_common_precursor(li_book):
    # counted independently: recipes whose target holds Co, and their precursors that hold Co
    count = Counter(formula_key(p) for r in li_book.recipes if "Co" in r.fractions for p in r.precursors
                    if "Co" in precursor_elements(formula_key(p)))
    li = Counter(formula_key(p) for r in li_book.recipes if "Li" in r.fractions for p in r.precursors
                 if "Li" in precursor_elements(formula_key(p)))
    popular = li_book.popularity_set(parse_formula("LiCoO2"))
    assert popular == {count.most_common(1)[0][0], li.most_common(1)[0][0]}
    assert formula_key("Li2CO3") in popular


def test_recommend_lifepo4_gives_a_li_and_fe_source_with_real_doi_evidence(li_book, records):
    out = recommend(li_book, parse_formula("LiFePO4"), k=5)
    top = out[0]
    assert any("Li" in parse_formula(p) for p in top["precursors"])
    assert any("Fe" in parse_formula(p) for p in top["precursors"])
    assert any("P" in parse_formula(p) for p in top["precursors"])
    # the evidence is real: a cited recipe not marked adapted has exactly that precursor set under its DOI
    top_keys = {formula_key(p) for p in top["precursors"]}
    real = {r["doi"] for r in records
            if {formula_key(p["material_formula"]) for p in r["precursors"]} == top_keys}
    assert not top["evidence"][0]["adapted"]
    for ev in top["evidence"]:
        assert ev["adapted"] or ev["doi"] in real
        assert ev["adapted"] == ({formula_key(p) for p in ev["precursors"]} != top_keys)
    assert all(ev["similarity"] > 0.99 for ev in top["evidence"])  # LiFePO4 itself is known
    assert 300 <= top["max_temperature_c"] <= 1000
    assert all(ev["operations"] is not None for ev in top["evidence"])


def test_substitution_carries_a_neighbours_precursors_over_only_to_known_precursors(records):
    lfp = [r for r in records if r["target"].get("material_formula") == "LiFePO4"]
    na2co3 = [r for r in records if any(p.get("material_formula") == "Na2CO3" for p in r["precursors"])][:3]
    book = RecipeBook.from_records(lfp + na2co3)
    out = book.propose(parse_formula("NaFePO4"), k=3)
    top = {book.spelling[k] for k in out[0]["precursors"]}
    assert "Na2CO3" in top and not any("Li" in parse_formula(p) for p in top)
    assert book.recipes[out[0]["evidence"][0][0]].target_key == "LiFePO4"
    # without any known Na precursor, Li2CO3 -> Na2CO3 is not invented
    lfp_only = RecipeBook.from_records(lfp)
    assert lfp_only.propose(parse_formula("NaFePO4"), k=3) == []


def test_score_ranks_the_literature_set_first_and_flags_a_foreign_one(li_book):
    good = score_recipe(li_book, parse_formula("LiCoO2"), ["Li2CO3", "Co3O4"])
    assert good["rank"] == 1 and good["recipes_with_this_set"] > 10 and not good["unsourced_elements"]
    assert all(any("Co" in p for p in ev["precursors"]) for ev in good["evidence_same_set"])
    bad = score_recipe(li_book, parse_formula("LiCoO2"), ["Li2CO3", "NiO"])
    assert bad["rank"] is None and bad["score"] == 0 and bad["unsourced_elements"] == ["Co"]
    assert bad["foreign_elements"] == ["Ni"]


# --- the command and the workspace --------------------------------------------------------------------------------

def test_error_sentences():
    with pytest.raises(CMMAError, match="element cmma does not know \\(Xx\\)"):
        parse_formula("Xx2O3")
    with pytest.raises(CMMAError, match="not a formula cmma can read"):
        parse_formula("La1-xCaxMnO3")
    with pytest.raises(CMMAError, match="not a formula cmma can read"):
        parse_formula("lithium iron phosphate")


def test_cli_errors_and_no_recipes(cli, tmp_path):
    result = cli("recommend", "Qq3O4", "-w", tmp_path)
    assert result.exit_code == 2 and "does not know (Qq)" in result.output
    result = cli("recommend", "LiFePO4", "-w", tmp_path)
    assert result.exit_code == 2 and "No synthesis recipes" in result.output and "--recipes" in result.output
    (tmp_path / "r.json").write_text(json.dumps({"doi": "x"}))
    result = cli("recommend", "--score", tmp_path / "r.json", "--target", "LiCoO2", "-w", tmp_path)
    assert result.exit_code == 2 and "names no precursors" in result.output


def test_fetch_keeps_every_recipe_and_recommend_reads_the_workspace(cli, tmp_path, shared_data, records):
    """A local fetch links few recipes to structures but keeps all of them in raw/recipes.parquet."""
    import pandas as pd

    src = pd.read_csv(shared_data / "mp20" / "mp20_sample.csv").head(20)
    src.to_csv(tmp_path / "s.csv", index=False)
    slice_ = [r for r in records if _has(r, "Li")][:400]
    (tmp_path / "solid-state.json").write_text(json.dumps({"reactions": slice_}))
    ws = tmp_path / "ws"
    result = cli("fetch", "-w", ws, tmp_path / "s.csv", tmp_path / "solid-state.json")
    assert result.exit_code == 0, result.output
    every = pd.read_parquet(ws / "raw" / "recipes.parquet")
    linked = pd.read_parquet(ws / "raw" / "synthesis.parquet")
    from cmma_cli.sources.recipes import recipe_id

    assert len(every) == len({recipe_id(r) for r in slice_}) > 300
    assert linked["recipe_id"].nunique() < len(every)
    result = cli("recommend", "LiCoO2", "-w", ws, "--json", "-k", "2")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["recipes_from"].endswith("recipes.parquet") and len(answer["proposals"]) == 2
    assert any("Li" in parse_formula(p) for p in answer["proposals"][0]["precursors"])
    assert {"doi", "reaction", "operations"} <= set(answer["proposals"][0]["evidence"][0])


def test_cli_recipes_file_and_score(cli, tmp_path, records):
    path = tmp_path / "solid-state.json"
    path.write_text(json.dumps({"reactions": [r for r in records if _has(r, "Co")][:300]}))
    result = cli("recommend", "LiCoO2", "--recipes", path, "-k", "2", "-w", tmp_path)
    assert result.exit_code == 0 and "1. Co3O4 + Li2CO3" in result.output and "doi:" in result.output
    (tmp_path / "mine.json").write_text(json.dumps({"precursors": ["Li2CO3", "Co3O4"]}))
    result = cli("recommend", "--score", tmp_path / "mine.json", "--target", "LiCoO2", "--recipes", path, "--json",
                 "-w", tmp_path)
    assert result.exit_code == 0 and json.loads(result.output)["rank"] == 1


def test_recipe_amounts_are_arithmetic_on_their_variables_and_nothing_else():
    """Amounts come from the user's recipe file: they are read as + - * / over numbers and the recipe's own
    variables, never run as code (attribute access or calls give no amount)."""
    from cmma_cli.composition import _evaluate

    assert _evaluate("5.5-x", {"x": 0.5}) == 5.0 and _evaluate("1.5*z+26", {"z": 2}) == 29.0
    assert _evaluate("-(x+1)/2", {"x": 1}) == -1.0 and _evaluate(3, {}) == 3.0
    assert _evaluate("y", {"x": 1}) is None and _evaluate("x/0", {"x": 1}) is None
    assert _evaluate("x.real", {"x": 1.0, "real": 2.0}) is None
    assert _evaluate("x()", {"x": 1.0}) is None
