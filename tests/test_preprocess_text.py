"""Synthesis text cleaning on real text-mined recipes (../shared/data/synthesis), and text normalisation."""

from __future__ import annotations

import json
import lzma
import re
import unicodedata

import pytest

from cmma_cli.preprocess.text import compose_procedure, excerpt, normalize_text


@pytest.fixture(scope="module")
def solid_state(shared_data):
    with lzma.open(shared_data / "synthesis" / "solid-state_dataset_2019-12-03.json.xz") as fh:
        return json.load(fh)["reactions"]


@pytest.fixture(scope="module")
def sol_gel(shared_data):
    with lzma.open(shared_data / "synthesis" / "sol-gel_dataset_20200713.json.xz") as fh:
        return json.load(fh)["reactions"]


def by_doi(recipes, doi, target=None):
    for r in recipes:
        if r["doi"] == doi and (target is None or r["target"]["material_formula"] == target):
            return r
    raise LookupError(doi)


def test_solid_state_recipe_is_composed_from_its_fields_in_order(solid_state):
    recipe = by_doi(solid_state, "10.1016/j.materresbull.2007.07.027", "Ba2HoTaO6")
    text = compose_procedure(recipe, synthesis_type="solid-state")
    assert text.startswith("Solid-state synthesis of Ba2HoTaO6. Precursors: Ta2O5, BaCO3, Ho2O3. ")
    assert "Reaction: 0.5 Ta2O5 + 2 BaCO3 + 0.5 Ho2O3 -> 1 Ba2HoTaO6 + 2 CO2." in text
    assert (
        "Procedure: dried at 100-1000 °C; ground in acetone; drying; heated at 1200 °C for 12 h; "
        "reground; pressed; reground; repelleted." in text
    )
    # the excerpt adds the supplier; its cut words are dropped, never left broken
    assert (
        "Excerpt: All materials were obtained from Aldrich ... repelleted after each 24 or 48 h heating period." in text
    )
    assert "<...>" not in text and "Chemicals" not in text


def test_oxygen_deficient_and_variable_formulas_stay_intact(solid_state):
    lsgm = by_doi(solid_state, "10.1016/j.materresbull.2007.09.012")
    text = compose_procedure(lsgm)
    assert text.startswith("Synthesis of La0.9Sr0.1Ga0.85Mg0.15O3-δ. ")
    assert "sintered at 1500 °C for 12 h in air; cooled." in text
    assert "mixed using Zirconia; milling using Zirconia;" in text
    langasite = next(r for r in solid_state if r["target"]["material_formula"] == "La3Nb0.5Ga5.5-xAlxO14")
    assert compose_procedure(langasite).startswith("Synthesis of La3Nb0.5Ga5.5-xAlxO14 (x = 0.2). ")


def test_sol_gel_hydrates_ranges_and_atmospheres(sol_gel):
    recipe = by_doi(sol_gel, "10.1149/1.1580819")
    text = compose_procedure(recipe)
    assert text.startswith("Sol-gel synthesis of LiMn2O4. Precursors: Li(CH3COO)·2H2O, Mn(CH3COO)2·4H2O. ")
    assert "evaporated at 70-80 °C; decomposed at 500 °C for 10 h in air; calcined at 800 °C for 10 h in air." in text
    assert "dissolved in water" in text


def test_units_are_normalised_kelvin_to_celsius_days_to_hours_minutes_kept(sol_gel):
    kelvin = compose_procedure(by_doi(sol_gel, "10.1149/1.3518756"))  # recorded as 343 K and 673 K
    assert "heated at 70 °C; heated at 400 °C; calcined at 600 °C." in kelvin
    days = compose_procedure(by_doi(sol_gel, "10.1002/polb.23041"))  # "kept ... for 4 day"
    assert "kept at 80 °C for 96 h" in days and "calcined at 400-700 °C for 1-3 h in air" in days
    minutes = compose_procedure(by_doi(sol_gel, "10.1149/1.1572481"))
    assert "heated at 400 °C for 30 min" in minutes
    assert minutes.startswith("Sol-gel synthesis of LiNi0.7AlxByO2 (x = 0, 0.1, 0.2, 0.3; y = 0.3). ")


def test_every_real_recipe_composes_to_clean_text(solid_state, sol_gel):
    sample = solid_state[::4] + sol_gel[::4]
    for recipe in sample:
        text = compose_procedure(recipe)
        assert "synthesis of" in text.split(".")[0].lower(), text
        assert "  " not in text and "<...>" not in text and "==" not in text, text
        assert not re.search(r"(?<![\w.])\d+(?:\.\d+)?\s?(?:℃|oC|hrs?|hours|minutes)\b", text), text  # one spelling
        assert not re.search(r"[\u2010-\u2015\u2212\u22c5\u2103]", text), text
        assert not any(unicodedata.category(ch)[0] == "C" for ch in text), text  # no control / private-use
        target = recipe["target"]["material_formula"] or ""
        if re.fullmatch(r"[A-Za-z0-9().+\-·δ]+", target):
            assert target in text, (target, text)  # formulas pass through untouched


def test_excerpt_drops_words_the_cuts_broke():
    assert excerpt("Starting powders of La2O3 (99.99%, Sigma-Aldrich, <...>sample show single-phase LSGM.") == (
        "Starting powders of La2O3 (99.99%, Sigma-Aldrich, ... show single-phase LSGM."
    )
    # the sol-gel layout pads the marker with a space; a second space means the cut fell between words
    assert excerpt("prepared by a sol-gel method  <...>  h in air.") == "prepared by a sol-gel method ... h in air."
    assert excerpt("prepared by a chem <...> letely evaporated.") == "prepared by a ... evaporated."
    assert excerpt(None) == ""


def test_normalize_text_units_ranges_unicode_and_formulas():
    raw = "heated at 800 ℃ for 2 hrs , then 70 ~ 80 oC  for 30 minutes;\u00a0 1073K, LiFePO₄ and La0.9Sr0.1O3−δ in 5 to 10 h ."
    assert normalize_text(raw) == (
        "heated at 800 °C for 2 h, then 70-80 °C for 30 min; 800 °C, LiFePO4 and La0.9Sr0.1O3-δ in 5-10 h."
    )
    # numbers glued to letters belong to formulas and are left alone
    assert normalize_text("Li2CO3 and K2CO3 and Co3O4, 5 H2O") == "Li2CO3 and K2CO3 and Co3O4, 5 H2O"
    assert normalize_text("1:2 molar ratio, pH 7-8") == "1:2 molar ratio, pH 7-8"
    assert normalize_text(None) == "" and normalize_text("  ") == ""


def test_free_text_kelvin_and_days_are_normalised_like_the_structured_fields():
    # the structured fields turn kelvin into whole °C and days into hours; prose must say the same, or the text
    # encoder sees two spellings of one condition
    assert normalize_text("annealed at 1073 K for 3 days") == "annealed at 800 °C for 72 h"
    assert normalize_text("1073-1173 K for 2 to 3 days, then 1 week") == "800-900 °C for 48-72 h, then 168 h"
    assert normalize_text("sintered at 873.15 Kelvin for 0.5 day") == "sintered at 600 °C for 12 h"
    # what is not a quantity stays: formulas with K, a bare "d" (orbitals)
    assert normalize_text("K2CO3 and KNO3, 3 d orbitals") == "K2CO3 and KNO3, 3 d orbitals"
