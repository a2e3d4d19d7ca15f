"""Supervised baselines: classification beside regression, on the same split, and a workspace that can move."""

from __future__ import annotations

import math

import numpy as np

import pytest

from cmma_cli.config import EvaluateConfig
from cmma_cli.errors import CMMAError
from cmma_cli.evaluate.data import load_eval_data
from cmma_cli.evaluate.pipeline import run_evaluate
from cmma_cli.workspace import Workspace, read_manifest

RUN = "sample"


@pytest.fixture(scope="module")
def moved(embedded_sample, tmp_path_factory) -> Workspace:
    """A copy of the session's embedded sample, in another folder than the one it was embedded in."""
    return embedded_sample.copy(tmp_path_factory.mktemp("moved") / "elsewhere")


def test_the_embeddings_manifest_records_the_checkpoint_relative_to_the_workspace(moved, embedded_sample):
    recorded = read_manifest(moved.embeddings_dir(RUN))["checkpoint"]["path"]
    assert recorded == f"runs/{RUN}/best.pt"
    data = load_eval_data(moved, RUN)  # the copy finds its own checkpoint, not the original's
    assert data.checkpoint == moved.root / "runs" / RUN / "best.pt" and data.checkpoint.is_file()


def test_classification_baselines_sit_beside_the_probes_in_the_report(moved):
    cfg = EvaluateConfig(run=RUN, sections=["probes", "baselines"], baseline_epochs=2, baseline_properties=["none"],
                         baseline_tasks=["crystal_system"])
    metrics = run_evaluate(moved, cfg)
    base = metrics["baselines"]
    assert base["regression"] == {}  # "none": no property baselines
    scores = base["classification"]["crystal_system"]
    assert set(scores) == {"structure", "text", "xrd", "intermediate fusion", "late fusion"}
    data = load_eval_data(moved, RUN)
    test = data.materials.query("split == 'test'")
    n_test = int(test["crystal_system"].notna().sum())
    probe = metrics["probes"]["classification"]["crystal_system"]["unified"]
    for name, s in scores.items():
        assert s["n"] == n_test == probe["n_test"], name  # every sample material has all three modalities
        for key in ("accuracy", "macro_f1", "roc_auc"):
            assert 0.0 <= s[key] <= 1.0 or math.isnan(s[key]), (name, key)
    assert scores["intermediate fusion"]["inputs"] == "structure+text+xrd"
    assert scores["late fusion"]["inputs"] == "mean of structure+text+xrd"

    report = (moved.reports_dir(RUN) / "report.md").read_text()
    table = report.split("### crystal_system", 1)[1].split("###", 1)[0]
    assert "| CMMA logistic probe | unified |" in table and "| supervised late fusion | mean of structure+text+xrd |" in table
    assert "The same for the classification tasks (test macro F1" in report
    verdict = [ln for ln in report.splitlines() if ln.startswith("| crystal_system |")]
    assert len(verdict) == 1 and ("CMMA better by" in verdict[0] or "fusion better by" in verdict[0] or "tie" in verdict[0])


def test_an_unknown_baseline_task_gets_one_sentence(moved):
    with pytest.raises(CMMAError, match="--baseline-tasks names vibes: choose from stable, metal, crystal_system, or none"):
        run_evaluate(moved, EvaluateConfig(run=RUN, sections=["baselines"], baseline_tasks=["vibes"]))


def test_a_baseline_learns_its_target(moved):
    """Trained, a structure baseline fits density far better than the untrained network it starts from (which a
    baseline that never trains would return), and better than predicting the train mean."""
    from cmma_cli.encode import pick_device
    from cmma_cli.evaluate.baselines import MaterialSet, _split_tables, _targets, train_baseline
    from cmma_cli.evaluate import metrics as M
    from cmma_cli.modalities.base import Context
    from cmma_cli.model import read_checkpoint

    data = load_eval_data(moved, RUN)
    spec = read_checkpoint(data.checkpoint)["spec"]
    specs = {"structure": spec["encoders"]["structure"]}
    tables = _split_tables(moved, data, ["structure"])
    ctx = Context(data.processed_manifest, cache_dir=moved.cache, show_progress=False)
    train = MaterialSet(tables["train"], specs, ctx)
    sets = {"train": train, "val": MaterialSet(tables["val"], specs, ctx), "test": train}  # scored on what it fitted
    target = next(t for t in _targets(data, EvaluateConfig(), None) if t.name == "density")
    y_all = target.values.loc[train.material_ids].to_numpy().astype(float)
    keep = np.flatnonzero(~np.isnan(y_all))
    rows = {"train": keep, "val": np.array([], dtype=np.int64), "test": keep}
    y = {"train": y_all[keep], "val": np.array([]), "test": y_all[keep]}
    device = pick_device("cpu")
    untrained = train_baseline(specs, ["structure"], sets, rows, y, EvaluateConfig(baseline_epochs=0), device)
    trained = train_baseline(specs, ["structure"], sets, rows, y, EvaluateConfig(baseline_epochs=15,
                                                                                 baseline_lr=3e-3), device)
    mean = M.mae(y["test"], np.full(len(keep), y["train"].mean()))
    assert M.mae(y["test"], trained) < 0.7 * M.mae(y["test"], untrained)
    assert M.mae(y["test"], trained) < 0.9 * mean
