"""The composition hub: the composition modality's columns and encoder invariances, and synthesis recipes kept as
rows of their own (no structure) through preprocess, train, embed, evaluate and retrieve."""

from __future__ import annotations

import json
import lzma

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from cmma_cli.composition import INDEX
from cmma_cli.errors import CMMAError
from cmma_cli.modalities import get_modality
from cmma_cli.modalities.base import Context, Item
from cmma_cli.modalities.composition import ELEMENTS_COLUMN, FRACTIONS_COLUMN, CompositionSettings

COMPOSITION = get_modality("composition")
RECIPES = "synthesis/solid-state_dataset_2019-12-03.json.xz"


def _rows(*formulas: str):
    """Processed-like composition columns of ``formulas`` (as a query of each would give)."""
    import pyarrow as pa

    values = [COMPOSITION.read_query(f, None).values for f in formulas]
    return pa.table({"material_id": [str(i) for i in range(len(formulas))],
                     ELEMENTS_COLUMN: pa.array([v[ELEMENTS_COLUMN][0].tolist() for v in values], pa.list_(pa.int16())),
                     FRACTIONS_COLUMN: pa.array([v[FRACTIONS_COLUMN][0].tolist() for v in values],
                                                pa.list_(pa.float32()))})


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    spec = COMPOSITION.spec(CompositionSettings(), None, Context({}))
    return COMPOSITION.encoder(spec).eval(), spec


def _embed(encoder, table, rows=None):
    model, spec = encoder
    data = COMPOSITION.prepare(table, spec, Context({}))
    rows = np.arange(table.num_rows) if rows is None else np.asarray(rows)
    with torch.no_grad():
        return model(COMPOSITION.collate(data, rows, None)).numpy()


def test_the_vector_ignores_element_order_formula_scale_and_padding(encoder):
    table = _rows("LiFePO4", "PO4FeLi", "Li2Fe2P2O8", "Ba2HoTaO6", "LiCoO2")
    v = _embed(encoder, table)
    assert np.allclose(v[0], v[1], atol=1e-5) and np.allclose(v[0], v[2], atol=1e-5)
    alone = _embed(encoder, table, [4])[0]  # LiCoO2 padded to 4 elements beside Ba2HoTaO6, or alone with 3
    assert np.allclose(alone, v[4], atol=1e-5)
    assert not np.allclose(v[0], v[4], atol=1e-2)  # a different composition is a different vector


def test_the_element_order_never_matters_inside_the_model(encoder):
    """Shuffle the element slots of a batch by hand (the processed order is by atomic number): same vectors."""
    model, spec = encoder
    data = COMPOSITION.prepare(_rows("Ba2HoTaO6", "LiFePO4"), spec, Context({}))
    inputs = COMPOSITION.collate(data, np.arange(2), None)
    flipped = {k: v.flip(1) for k, v in inputs.items()}
    with torch.no_grad():
        assert torch.allclose(model(inputs), model(flipped), atol=1e-5)


def test_elements_start_from_the_shipped_mat2vec_vectors():
    from cmma_cli.modalities.composition.encoder import matscholar_table

    table = matscholar_table()
    assert table.shape == (103, 200)
    sims = table @ table.T
    # chemistry in the pretrained vectors: Na's nearest element is Li, Co's is Ni, Ba's is Sr
    for el, nearest in (("Na", "Li"), ("Co", "Ni"), ("Ba", "Sr")):
        assert int(sims[INDEX[el]].argsort(descending=True)[1]) == INDEX[nearest]
    assert sims[INDEX["Co"], INDEX["Ni"]] > sims[INDEX["Co"], INDEX["Cl"]]
    torch.manual_seed(0)
    model = COMPOSITION.encoder(COMPOSITION.spec(CompositionSettings(init="matscholar"), None, Context({})))
    assert torch.allclose(model.elements.weight, table)
    random = COMPOSITION.encoder(COMPOSITION.spec(CompositionSettings(), None, Context({})))  # the default
    assert random.elements.weight.shape == (103, 128)


def test_featurize_reads_the_structure_else_the_formula_else_a_recipe_target(tmp_path):
    from pymatgen.core import Lattice, Structure

    from cmma_cli.preprocess.recipes import raw_recipes

    nacl = Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    got = COMPOSITION.featurize(Item("a", nacl, {}), None)
    assert got[ELEMENTS_COLUMN].tolist() == [INDEX["Na"], INDEX["Cl"]]
    assert np.allclose(got[FRACTIONS_COLUMN], [0.5, 0.5])
    got = COMPOSITION.featurize(Item("b", None, {"composition": "Fe2O3"}), None)
    assert np.allclose(got[FRACTIONS_COLUMN], [0.6, 0.4]) and got[ELEMENTS_COLUMN].tolist() == [INDEX["O"], INDEX["Fe"]]
    bad = Item("c", None, {"composition": "lithium iron phosphate"})
    assert COMPOSITION.featurize(bad, None) == {} and bad.rejects and bad.rejects[0][0] == "composition"
    target = {"composition": [{"amount": "1", "elements": {"La": "1-x", "Ca": "x", "Mn": "1", "O": "3"}}],
              "amounts_vars": {"x": {"values": [0.25]}}}
    pd.DataFrame({"recipe_id": ["r"], "doi": ["x"], "synthesis_type": ["solid-state"], "target_formula": ["LCMO"],
                  "record": [json.dumps({"target": target})]}).to_parquet(tmp_path / "recipes.parquet")
    fractions = COMPOSITION.gather_recipes(None, raw_recipes(tmp_path))  # the recipes as preprocess reads them
    assert fractions["r"] == pytest.approx({"Ca": 0.05, "Mn": 0.2, "O": 0.6, "La": 0.15})


def test_a_formula_query_is_one_row_or_one_sentence():
    got = COMPOSITION.read_query("Fe2(SO4)3", None)
    assert got.ids == ["Fe2(SO4)3"] and len(got.values[ELEMENTS_COLUMN][0]) == 3
    with pytest.raises(CMMAError, match="does not know"):
        COMPOSITION.read_query("Qq2O3", None)
    with pytest.raises(CMMAError, match="no variables"):
        COMPOSITION.read_query("La1-xCaxMnO3", None)


# --- recipe rows through every stage ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hub_ws(shared_data, tmp_path_factory):
    """60 MP-20 materials and 250 real recipes (those whose target is one of the materials' formulas, and others of
    the same elements, which no structure matches), fetched and preprocessed: ``(folder, workspace, distinct
    recipes linked to a material, preprocess output)``."""
    from typer.testing import CliRunner

    from cmma_cli.cli import app

    from pymatgen.core import Composition

    from cmma_cli.sources.recipes import recipe_id, target_formula

    tmp = tmp_path_factory.mktemp("hub")
    src = pd.read_csv(shared_data / "mp20" / "mp20_sample.csv")
    records = json.load(lzma.open(shared_data / RECIPES))["reactions"]

    def reduced(f):
        try:
            return Composition(f).reduced_formula
        except Exception:
            return None

    by_formula = {}
    for r in records:
        by_formula.setdefault(reduced(target_formula(r) or ""), []).append(r)
    src["reduced"] = src["pretty_formula"].map(reduced)
    linked = src[src["reduced"].isin(by_formula)]
    chosen = pd.concat([linked.head(30), src[~src.index.isin(linked.index)].head(60 - len(linked.head(30)))])
    chosen.drop(columns="reduced").to_csv(tmp / "s.csv", index=False)
    mine = [r for f in linked.head(30)["reduced"] for r in by_formula[f][:3]]
    elements = {str(e) for f in chosen["reduced"] for e in Composition(f).elements}
    others = [r for r in records if reduced(target_formula(r) or "") not in set(chosen["reduced"])
              and any(e in elements for e in ((r.get("target") or {}).get("composition") or [{}])[0].get("elements", {}))]
    (tmp / "recipes.json").write_text(json.dumps({"reactions": mine + others[: 250 - len(mine)]}))
    ws = tmp / "ws"
    runner = CliRunner()
    fetched = runner.invoke(app, ["fetch", "-w", str(ws), str(tmp / "s.csv"), str(tmp / "recipes.json")])
    assert fetched.exit_code == 0, fetched.output
    result = runner.invoke(app, ["preprocess", "-w", str(ws)])
    assert result.exit_code == 0, result.output
    return tmp, ws, len({recipe_id(r) for r in mine}), result.output


def test_recipes_become_rows_and_hold_out_with_their_materials(hub_ws):
    tmp, ws, linked, output = hub_ws
    assert "synthesis recipes kept as rows of their own" in " ".join(output.split())
    recipes = pq.read_table(ws / "processed" / "recipes.parquet").to_pandas()
    every = pq.read_table(ws / "raw" / "recipes.parquet").num_rows  # the 250, duplicates once
    assert len(recipes) == every > 240 and linked >= 10
    assert recipes["atomic_numbers"].isna().all() and recipes["xrd"].isna().all()  # no structure, no view of one
    assert recipes["synthesis_texts"].map(len).eq(1).all()
    assert recipes[ELEMENTS_COLUMN].notna().mean() > 0.8
    rejects = pq.read_table(ws / "processed" / "rejects.parquet").to_pandas()
    assert not (rejects["source"] == "structure").any()  # a recipe row has no structure to reject
    # a recipe of a held-out material's formula is held out with it
    splits = pq.read_table(ws / "processed" / "splits.parquet").to_pandas()
    group_split = dict(zip(splits["group"], splits["split"]))
    shared = recipes[recipes["formula"].isin(group_split)]
    assert len(shared) >= linked and (shared["split"] == shared["formula"].map(group_split)).all()
    assert set(recipes["split"]) == {"train", "val", "test"}
    manifest = json.loads((ws / "processed" / "manifest.json").read_text())
    assert manifest["rows"]["recipes"] == every


def test_recipe_rows_train_embed_evaluate_and_answer_a_formula(cli, hub_ws):
    tmp, ws, _, _ = hub_ws
    common = ["--modalities", "structure,composition,text", "--pairs", "anchor:composition", "--epochs", "2",
              "--batch-size", "32", "--structure-encoder", "schnet", "--structure-hidden", "32", "--no-projector"]
    result = cli("train", "-w", ws, "--run", "hub", *common)
    assert result.exit_code == 0, result.output
    recipes = pq.read_table(ws / "processed" / "recipes.parquet").to_pandas()
    manifest = json.loads((ws / "runs" / "hub" / "manifest.json").read_text())
    trainable = (recipes["split"] == "train") & recipes[ELEMENTS_COLUMN].notna()  # text and composition: a pair
    assert manifest["rows"]["recipes"] == int(trainable.sum()) > 120
    assert "synthesis recipes" in " ".join(result.output.split())
    result = cli("train", "-w", ws, "--run", "plain", *common, "--no-recipes")
    assert result.exit_code == 0, result.output
    assert json.loads((ws / "runs" / "plain" / "manifest.json").read_text())["rows"]["recipes"] == 0
    assert cli("embed", "-w", ws, "--run", "hub").exit_code == 0
    composition = pq.read_table(ws / "embeddings" / "hub" / "composition.parquet").to_pandas()
    assert len(composition) == 60  # the materials, not the recipe rows
    result = cli("evaluate", "-w", ws, "--run", "hub", "--sections", "synthesis")
    assert result.exit_code == 0, result.output
    from cmma_cli.composition import formula_key

    processed = pq.read_table(ws / "processed" / "materials.parquet", columns=["material_id", "formula"]).to_pandas()
    formula = processed["formula"].iloc[0]
    result = cli("retrieve", "-w", ws, "--run", "hub", "--formula", formula, "--to", "composition", "--json", "-k", "3")
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output)["results"]
    same = set(processed.loc[processed["formula"].map(formula_key) == formula_key(formula), "material_id"])
    assert hits[0]["material_id"] in same


def test_recipe_rows_make_batches_of_their_own_unless_too_few():
    from cmma_cli.modalities.batches import EpochBatches

    rows = np.arange(100)
    kinds = (rows >= 30).astype(np.int64)  # 30 materials, 70 recipe rows
    batches = [b for b, _ in EpochBatches(rows, 10, seed=0, kinds=kinds)]
    assert len(batches) == 10 and all(len(set(kinds[b])) == 1 for b in batches)
    assert sorted(np.concatenate(batches).tolist()) == rows.tolist()  # each row once: both kinds fill whole steps
    assert all(len(set(b.tolist())) == len(b) for b in batches)
    mixed = [b for b, _ in EpochBatches(rows, 40, seed=0, kinds=kinds)]  # 30 materials cannot fill a step of 40
    assert any(len(set(kinds[b])) == 2 for b in mixed) and all(len(set(b.tolist())) == len(b) for b in mixed)


def test_the_python_api_encodes_compositions_in_every_spelling(cli, hub_ws):
    import cmma_cli
    from pymatgen.core import Composition

    tmp, ws, _, _ = hub_ws
    if not (ws / "embeddings" / "hub").exists():  # the run the test above trains
        result = cli("train", "-w", ws, "--run", "hub", "--modalities", "structure,composition,text", "--pairs",
                     "anchor:composition", "--epochs", "1", "--structure-encoder", "schnet", "--structure-hidden", "32",
                     "--no-projector")
        assert result.exit_code == 0, result.output
        assert cli("embed", "-w", ws, "--run", "hub").exit_code == 0
    session = cmma_cli.load(ws, run="hub")
    v = session.encode(compositions=["LiFePO4", "Li2Fe2P2O8", Composition("FePO4Li"), {"Li": 1, "Fe": 1, "P": 1, "O": 4},
                                     "Fe2O3"])
    assert v.shape == (5, session.retriever.encoder().dim)
    assert np.allclose(v[:4], v[0], atol=1e-5) and not np.allclose(v[4], v[0], atol=1e-3)
    assert np.allclose(session.encode(formulas="LiFePO4")[0], v[0], atol=1e-6)
    with pytest.raises(CMMAError, match="does not know"):
        session.encode(compositions="Qq2O3")
    with pytest.raises(CMMAError, match="not recipes="):
        session.encode(recipes=["x"])
