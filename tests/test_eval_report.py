"""``cmma evaluate`` on the built-in sample: probes never fit on test rows; the report has every section, in range."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from cmma_cli.config import EvaluateConfig
from cmma_cli.errors import CMMAError
from cmma_cli.evaluate.data import load_eval_data
from cmma_cli.evaluate.pipeline import run_evaluate
from cmma_cli.evaluate.probes import run_probes
from cmma_cli.evaluate.retrieval import run_retrieval
from cmma_cli.workspace import Workspace, read_manifest

FAST_EVAL = EvaluateConfig(run="sample", baseline_epochs=2, explain_examples=1)
RUN = "sample"


@pytest.fixture(scope="module")
def embedded(embedded_sample, tmp_path_factory) -> Workspace:
    """A copy of the session's embedded sample workspace (run ``sample``), which these tests write reports into."""
    return embedded_sample.copy(tmp_path_factory.mktemp("eval") / "ws")


@pytest.fixture(scope="module")
def report(embedded):
    """The full report of run ``sample`` (every section)."""
    metrics = run_evaluate(embedded, FAST_EVAL)
    return embedded.reports_dir(RUN), metrics


def test_probes_fit_only_on_train_and_val_materials(embedded):
    data = load_eval_data(embedded, RUN)
    splits = pd.read_parquet(embedded.processed / "splits.parquet").set_index("material_id")["split"]
    results, audits = run_probes(data, tables=["unified", "structure"])
    assert results["regression"] and results["classification"]
    assert ("formation_energy_per_atom", "unified") in audits and ("crystal_system", "structure") in audits
    for (target, table), audit in audits.items():
        assert audit.fit_ids and audit.test_ids
        assert not audit.fit_ids & audit.test_ids, (target, table)
        assert set(splits.loc[list(audit.fit_ids)]) <= {"train", "val"}
        assert set(splits.loc[list(audit.test_ids)]) == {"test"}
    # the number of test rows scored is exactly the test materials that have the target
    fe = data.materials.query("split == 'test'")["formation_energy_per_atom"].notna().sum()
    assert results["regression"]["formation_energy_per_atom"]["unified"]["n_test"] == fe


def test_properties_no_material_has_are_not_probed(embedded):
    data = load_eval_data(embedded, RUN)
    # the raw schema has every Materials Project column; the sample has no band gaps at all
    assert data.materials["band_gap"].isna().all()
    assert "band_gap" not in data.numeric_properties
    assert data.numeric_properties == ["formation_energy_per_atom", "density"]
    results, _ = run_probes(data, tables=["unified"])
    assert set(results["regression"]) == {"formation_energy_per_atom", "density"}
    assert not [s for s in results["skipped"] if s["target"] == "band_gap"]  # not a wall of "0 train rows"


def test_retrieval_uses_the_test_split_and_reports_chance(embedded):
    data = load_eval_data(embedded, RUN)
    out = run_retrieval(data, (1, 5, 10))
    assert set(out["pairs"]) == {f"{a}->{b}" for a in ("structure", "text", "xrd") for b in ("structure", "text", "xrd") if a != b}
    n_test = len(data.split_ids("test"))
    s = out["pairs"]["structure->xrd"]
    assert s["queries"] == s["gallery"] == n_test  # every sample material has a structure and a pattern
    assert s["chance_recall@1"] == pytest.approx(1 / n_test)
    assert s["recall@1"] <= s["recall@5"] <= s["recall@10"] <= 1
    assert 1 <= s["median_rank"] <= n_test


def test_retrieval_scores_each_query_against_its_own_material(embedded):
    """Recomputed here from the embedding tables alone: a query paired with the wrong material would not match."""
    data = load_eval_data(embedded, RUN)
    out = run_retrieval(data, (1, 5, 10))
    test = set(data.split_ids("test"))
    emb = {t: pd.read_parquet(embedded.embeddings_dir(RUN) / f"{t}.parquet").set_index("material_id")["embedding"]
           for t in ("structure", "xrd")}
    ids = [m for m in data.split_ids("test") if m in emb["structure"].index and m in emb["xrd"].index]
    assert set(ids) <= test
    q = np.stack([np.asarray(emb["structure"][m], dtype=float) for m in ids])
    g = np.stack([np.asarray(emb["xrd"][m], dtype=float) for m in ids])
    sim = q @ g.T
    own = np.diag(sim)
    ranks = (sim >= own[:, None]).sum(axis=1)  # itself, plus every item as good or better (pessimistic ties)
    s = out["pairs"]["structure->xrd"]
    for k in (1, 5, 10):
        assert s[f"recall@{k}"] == pytest.approx(float(np.mean(ranks <= k)), abs=1e-9)
    assert s["mrr"] == pytest.approx(float(np.mean(1 / ranks)), rel=1e-6)
    assert s["mrr"] > s["chance_mrr"]  # a trained run finds its own material above chance


def _in_unit(value) -> bool:
    return isinstance(value, float) and (math.isnan(value) or 0.0 <= value <= 1.0)


@pytest.mark.slow  # the full report: baselines, UMAP and t-SNE, attributions (about a minute of CPU)
def test_the_report_has_every_section_and_numbers_in_range(report):
    out, metrics = report
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    text = (out / "report.md").read_text()
    for heading in ("## Property probes (regression)", "## Classification probes", "## Cross-modal retrieval",
                    "## Synthesis match", "## Baselines", "## Latent space", "## What drives the similarity"):
        assert heading in text
    assert "### formation_energy_per_atom" in text and "### crystal_system" in text
    run = metrics["run"]
    assert run["splits"]["test"]["materials"] > 10 and run["command"].startswith("cmma evaluate -w ")
    for prop, by_table in metrics["probes"]["regression"].items():
        for scores in by_table.values():
            for model in ("dummy", "ridge", "mlp"):
                assert scores[model]["mae"] >= 0 and scores[model]["rmse"] >= scores[model]["mae"] - 1e-12
                assert scores[model]["r2"] <= 1
    for by_table in metrics["probes"]["classification"].values():
        for scores in by_table.values():
            for model in ("dummy", "logistic", "mlp"):
                assert all(_in_unit(scores[model][k]) for k in ("accuracy", "macro_f1", "roc_auc"))
            assert scores["dummy"]["roc_auc"] == pytest.approx(0.5)
    for s in metrics["retrieval"]["pairs"].values():
        assert all(_in_unit(s[k]) for k in ("recall@1", "recall@5", "recall@10", "mrr", "map"))
    # the built-in sample has descriptions but no recipes: the section says so instead of inventing scores
    assert metrics["synthesis"]["by_modality"] == {} and "no synthesis recipes" in metrics["synthesis"]["note"]
    purity = metrics["latent"]["purity"]["unified"]
    assert 0 <= purity["purity"] <= 1 and 0 < purity["chance"] < 1
    assert len(metrics["latent"]["interpolation"]["path"]) == FAST_EVAL.interpolation_steps
    assert read_manifest(out)["stage"] == "evaluate"


@pytest.mark.slow  # the full report: baselines, UMAP and t-SNE, attributions (about a minute of CPU)
def test_figures_are_written_and_non_empty(report):
    out, metrics = report
    names = metrics["latent"]["figures"]
    assert {"umap_crystal_system.png", "tsne_crystal_system.png"} <= set(names)
    for name in names:
        path = out / "figures" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
        assert f"figures/{name}" in (out / "report.md").read_text()
    # the maps' coordinates, one row per material and method, for `cmma serve`'s interactive map
    coords = pd.read_parquet(out / "figures" / metrics["latent"]["coordinates"])
    assert list(coords.columns) == ["material_id", "method", "x", "y"] and set(coords["method"]) == {"umap", "tsne"}
    assert coords.groupby("method")["material_id"].nunique().min() > 100 and coords[["x", "y"]].notna().all().all()


@pytest.mark.slow  # the full report: baselines, UMAP and t-SNE, attributions (about a minute of CPU)
def test_an_unchanged_report_is_skipped(report, embedded, capfd):
    out, metrics = report
    before = (out / "metrics.json").stat().st_mtime_ns
    again = run_evaluate(embedded, FAST_EVAL)
    assert (out / "metrics.json").stat().st_mtime_ns == before and again["run"] == metrics["run"]
    assert "up to date" in capfd.readouterr().err


def test_mistakes_get_one_sentence(embedded):
    with pytest.raises(CMMAError, match=r"Run 'nope' has no embeddings .* run `cmma embed --run nope` first"):
        run_evaluate(embedded, EvaluateConfig(run="nope"))
    with pytest.raises(CMMAError, match="--sections must name some of probes, retrieval"):
        run_evaluate(embedded, EvaluateConfig(run=RUN, sections=["probes", "vibes"]))
    with pytest.raises(CMMAError, match="--baseline-properties names heat_all, which the processed data does not have"):
        run_evaluate(embedded, EvaluateConfig(run=RUN, sections=["baselines"], baseline_properties=["heat_all"]))


def test_explain_attributes_one_material_to_its_atoms_words_and_2theta_regions(embedded):
    from cmma_cli.evaluate.data import load_eval_data
    from cmma_cli.evaluate.explain import run_explain, safe_filename

    data = load_eval_data(embedded, RUN)
    mid = str(data.split_ids("test")[0])
    result = run_explain(embedded, EvaluateConfig(run=RUN), mid)
    pairs = {p["pair"]: p for p in result["pairs"]}
    assert set(pairs) == {"structure-text", "structure-xrd"}
    # the similarity explained is the one the embeddings hold
    emb = {t: pd.read_parquet(embedded.embeddings_dir(RUN) / f"{t}.parquet").set_index("material_id")["embedding"]
           for t in ("structure", "text", "xrd")}
    for other in ("text", "xrd"):
        expected = float(np.dot(emb["structure"][mid], emb[other][mid]))
        assert pairs[f"structure-{other}"]["similarity"] == pytest.approx(expected, abs=1e-4)
    nsites = pd.read_parquet(embedded.processed / "materials.parquet", columns=["material_id", "nsites"]).set_index(
        "material_id").loc[mid, "nsites"]
    text_pair = pairs["structure-text"]
    assert len(text_pair["atoms"]) == nsites
    assert set(text_pair["elements"]) == set(data.materials.set_index("material_id").loc[mid, "elements"])
    assert all(-1 <= a["score"] <= 1 for a in text_pair["atoms"])
    # the atoms carry the attribution: not all zero, and not one value smeared over every atom
    scores = [a["score"] for a in text_pair["atoms"]]
    assert max(abs(v) for v in scores) > 1e-4
    assert nsites == 1 or len({round(v, 6) for v in scores}) > 1 or len(set(text_pair["elements"])) == 1
    words = text_pair["text"].lower()
    assert text_pair["tokens"] and all(t["token"] in words for t in text_pair["top_tokens"])
    regions = pairs["structure-xrd"]["regions"]
    assert [r["start"] for r in regions] == list(np.arange(10.0, 90.0, 5.0))
    assert any(r["score"] != 0 for r in regions)
    folder = embedded.reports_dir(RUN) / "explain"
    stem = safe_filename(mid)  # sample ids hold colons, e.g. aflow:AB2_tI6_139_a_e:Si2Mo
    assert (folder / f"{stem}.md").read_text().count("**structure-") == 2  # both pairs rendered
    assert (folder / f"explain_{stem}_xrd.png").stat().st_size > 10_000
    with pytest.raises(CMMAError, match="There is no material 'mp-nope'"):
        run_explain(embedded, EvaluateConfig(run=RUN), "mp-nope")


def test_missing_modality_ablation_rebuilds_the_unified_embedding_without_it(embedded):
    from cmma_cli.evaluate.ablations import run_ablation

    result = run_ablation(embedded, EvaluateConfig(run=RUN), "missing")
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"all modalities", "without structure", "without text", "without xrd"}
    for row in rows.values():
        assert row["density MAE"] > 0 and row["density R²"] <= 1
    assert len({round(r["density MAE"], 9) for r in rows.values()}) == 4  # each variant is a different space
    md = (embedded.reports_dir(RUN) / "ablation-missing.md").read_text()
    assert "| without xrd |" in md
    with pytest.raises(CMMAError, match="--ablation must be one of temperature, dim, modalities, missing, encoder, loss, "
                                        "not 'optimizer'"):
        run_ablation(embedded, EvaluateConfig(run=RUN), "optimizer")


@pytest.mark.slow
def test_temperature_ablation_trains_both_variants_and_tables_them(embedded):
    from cmma_cli.evaluate.ablations import run_ablation

    result = run_ablation(embedded, EvaluateConfig(run=RUN, ablation_epochs=1), "temperature")
    assert [r["variant"] for r in result["rows"]] == ["learnable", "fixed"]
    for row in result["rows"]:
        manifest = read_manifest(embedded.run_dir(row["run"]))
        assert manifest["config"]["epochs"] == 1
        assert 0 <= row["mean R@1"] <= 1 and row["density MAE"] > 0
    fixed = read_manifest(embedded.run_dir(result["rows"][1]["run"]))
    assert fixed["config"]["learn_temperature"] is False and fixed["last"]["temperature"] == pytest.approx(0.07, rel=1e-3)


@pytest.mark.slow
def test_loss_ablation_trains_contrastive_prediction_only_and_both_and_tables_them(embedded):
    from cmma_cli.evaluate.ablations import run_ablation

    result = run_ablation(embedded, EvaluateConfig(run=RUN, ablation_epochs=1), "loss")
    rows = result["rows"]
    assert [r["variant"] for r in rows] == ["contrastive", "predict", "contrastive+predict"]
    for row in rows:
        manifest = read_manifest(embedded.run_dir(row["run"]))
        assert manifest["config"]["epochs"] == 1 and manifest["config"]["objective"] == row["variant"]
        assert ("predict" in manifest["spec"]) == (row["variant"] != "contrastive")  # the property head
        assert ("val_predict" in manifest["last"]) == (row["variant"] != "contrastive")
        assert 0 <= row["mean R@1"] <= 1 and row["density MAE"] > 0
    assert rows[2]["run"] == f"{RUN}-ablate-loss-contrastive-predict"
    md = (embedded.reports_dir(RUN) / "ablation-loss.md").read_text()
    assert "| contrastive+predict |" in md and "| predict |" in md
