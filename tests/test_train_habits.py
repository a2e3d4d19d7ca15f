"""What people expect from a training tool (open_clip's habits): gradient accumulation whose negatives span the
whole accumulated batch, keep-last-N checkpoints, TensorBoard's embedding projector, an optional W&B logger."""

from __future__ import annotations

import csv
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cmma_cli.config import TrainConfig
from cmma_cli.errors import CMMAError
from cmma_cli.model import read_checkpoint
from cmma_cli.train import run_train
from cmma_cli.workspace import RunFiles, Workspace, read_manifest

#: test_train.py's FAST config (three modalities, small), without the XRD augmentation: a micro-batch draws its
#: augmentation from its own seed, so only without it is a step of 2 x 16 the same batch as one of 32.
FAST = TrainConfig(
    modalities=["structure", "text", "xrd"], epochs=2, batch_size=32, lr=3e-3, warmup_epochs=1.0,
    embed_dim=32, proj_hidden=64, structure_encoder="schnet", structure_hidden=32, structure_layers=2, num_rbf=16,
    xrd_channels=8, xrd_out_dim=32, xrd_augment=False, seed=0,
)


@pytest.fixture(scope="module")
def sample_ws(embedded_sample, tmp_path_factory) -> Workspace:
    """The built-in sample's processed data and frozen-text cache, in a workspace of this module's own."""
    ws = Workspace(tmp_path_factory.mktemp("habits-ws"))
    shutil.copytree(embedded_sample.ws.processed, ws.processed)
    shutil.copytree(embedded_sample.ws.cache, ws.cache)
    return ws


def metrics(run_dir: Path) -> list[dict[str, float]]:
    with (run_dir / "metrics.csv").open() as fh:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt"))


# ------------------------------------------------------------------------------------ 1. accumulation


@pytest.fixture(scope="module")
def step_parts(sample_ws):
    """A model with a property head, the train materials and one 32-row batch (collated without random draws)."""
    from cmma_cli.modalities.base import Context
    from cmma_cli.modalities.batches import MaterialSet
    from cmma_cli.model import build_model, model_spec
    from cmma_cli.train import read_splits

    cfg = replace(FAST, objective="contrastive+predict")
    manifest = read_manifest(sample_ws.processed)
    ctx = Context(manifest, cache_dir=sample_ws.cache, show_progress=False)
    train, _ = read_splits(sample_ws, cfg.modalities, properties=list(manifest["properties"]))
    spec = model_spec(cfg, train, ctx)
    torch.manual_seed(0)
    model = build_model(spec)
    materials = MaterialSet(train, spec["encoders"], ctx, spec["predict"])
    return model, materials, np.arange(32)


def _gradients(model, batches, objective, in_modality_negatives):
    from cmma_cli.loss import MultiModalInfoNCE, parse_pairs
    from cmma_cli.train.loop import accumulated_backward

    loss_fn = MultiModalInfoNCE(parse_pairs("all", model.modalities), in_modality_negatives)
    model.zero_grad(set_to_none=True)
    loss, parts = accumulated_backward(model, batches, loss_fn, objective, 0.5, predicting="predict" in objective)
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads


def _relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return float(sum((a[k] - b[k]).norm() ** 2 for k in a) ** 0.5 / sum(a[k].norm() ** 2 for k in a) ** 0.5)


@pytest.mark.parametrize("objective, in_modality", [("contrastive", False), ("contrastive+predict", True)])
def test_four_accumulated_micro_batches_give_the_gradient_of_the_whole_batch(step_parts, objective, in_modality):
    """open_clip's accum_freq scheme: the negatives of each micro-batch are the whole step's batch."""
    model, materials, rows = step_parts
    whole_loss, whole = _gradients(model, [materials.collate(rows)], objective, in_modality)
    micro = [materials.collate(part) for part in np.array_split(rows, 4)]
    accumulated_loss, accumulated = _gradients(model, micro, objective, in_modality)
    assert accumulated_loss == pytest.approx(whole_loss, rel=1e-6)
    # 1.2e-6 relative on this machine (float32 sums in another order); the temperature's gradient included
    assert "logit_scale" in whole and _relative(whole, accumulated) < 1e-4
    assert float(accumulated["logit_scale"]) == pytest.approx(float(whole["logit_scale"]), rel=1e-4)
    # what the scheme is for: a plain sum of micro-batch losses (negatives within a micro-batch only) is another step
    plain = {k: torch.zeros_like(v) for k, v in whole.items()}
    for batch in micro:
        for k, g in _gradients(model, [batch], objective, in_modality)[1].items():
            plain[k] += g / len(micro)
    assert _relative(whole, plain) > 0.05  # 0.29 here


@pytest.fixture(scope="module")
def runs(sample_ws) -> dict[str, Path]:
    """Two epochs with one batch of 32 per step (no projector), and with 2 accumulated micro-batches of 16 (keeping
    the newest epoch checkpoint only)."""
    run_train(sample_ws, replace(FAST, projector=False), run="whole", gpus=0)
    run_train(sample_ws, replace(FAST, batch_size=16, accumulate=2, keep_checkpoints=1), run="accumulated", gpus=0)
    return {name: sample_ws.run_dir(name) for name in ("whole", "accumulated")}


def test_training_with_accumulation_is_training_with_the_whole_batch(runs):
    whole, accumulated = metrics(runs["whole"]), metrics(runs["accumulated"])
    assert [r["step"] for r in accumulated] == [8, 16]  # 238 train materials in steps of 32, not 16
    for a, b in zip(whole, accumulated):
        for key in ("train_loss", "val_loss", "val_r1", "temperature", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key  # 1e-7 here
    assert accumulated[-1]["train_loss"] < 0.95 * accumulated[0]["train_loss"]  # 10.62 -> 9.36
    assert accumulated[-1]["val_loss"] < accumulated[0]["val_loss"]  # 10.07 -> 9.38
    assert read_manifest(runs["accumulated"])["config"]["accumulate"] == 2


@pytest.mark.slow
def test_two_cpu_processes_with_accumulation_train_like_one_with_the_whole_batch(runs, sample_ws):
    run_train(sample_ws, replace(FAST, batch_size=8, accumulate=2, projector=False), run="ddp-accumulated", gpus=2)
    ddp, whole = metrics(sample_ws.run_dir("ddp-accumulated")), metrics(runs["whole"])
    assert read_manifest(sample_ws.run_dir("ddp-accumulated"))["world_size"] == 2
    assert [r["step"] for r in ddp] == [8, 16]
    for a, b in zip(ddp, whole):
        for key in ("train_loss", "val_loss", "val_r1", "temperature"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key


def test_each_micro_batch_draws_its_own_randomness_and_accumulate_below_1_is_refused(sample_ws):
    from cmma_cli.train.loop import MicroBatches

    class Fake:
        def collate(self, rows, rng=None, dropout=0.0):
            return {"rows": rows, "draw": None if rng is None else int(rng.integers(1 << 30))}

    batches = MicroBatches(Fake(), accumulate=3)[(np.arange(12), (0, 1, 2, 0))]
    assert [b["rows"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert len({b["draw"] for b in batches}) == 3  # each micro-batch its own random draws
    one = MicroBatches(Fake(), accumulate=1)[(np.arange(4), (0, 1, 2, 0))]
    assert one[0]["draw"] == int(np.random.default_rng((0, 1, 2, 0)).integers(1 << 30))  # as before accumulation

    with pytest.raises(CMMAError, match="--accumulate must be at least 1, not 0"):
        run_train(sample_ws, replace(FAST, accumulate=0), run="bad", gpus=0)
    assert not sample_ws.run_dir("bad").exists()


# ---------------------------------------------------------------------------------- 2. keep-last-N


def test_only_the_newest_epoch_checkpoints_are_kept_and_the_run_still_resumes(runs, sample_ws):
    assert checkpoints(runs["accumulated"]) == ["epoch-002.pt"]  # --keep-checkpoints 1
    assert checkpoints(runs["whole"]) == ["epoch-001.pt", "epoch-002.pt"]  # the default, 3, keeps both of 2
    run = Path(shutil.copytree(runs["accumulated"], sample_ws.run_dir("pruned")))  # the other tests read the original
    assert read_checkpoint(run / "best.pt")["epoch"] == 2 and read_checkpoint(run / "last.pt")["epoch"] == 2
    run_train(sample_ws, replace(FAST, batch_size=16, accumulate=2, keep_checkpoints=1, epochs=3, projector=False),
              run="pruned", resume="latest", gpus=0)
    assert [r["epoch"] for r in metrics(run)] == [1, 2, 3]
    assert checkpoints(run) == ["epoch-003.pt"]
    assert read_checkpoint(run / "last.pt")["epoch"] == 3 and (run / "best.pt").is_file()


def test_pruning_keeps_the_newest_n_best_last_and_later_epochs(tmp_path):
    from cmma_cli.train.runlog import RunLog

    files = RunFiles(tmp_path / "run")
    log = RunLog(files, replace(FAST, keep_checkpoints=2), start_epoch=1)
    files.epoch_checkpoint(9).parent.mkdir(parents=True, exist_ok=True)
    files.epoch_checkpoint(9).write_bytes(b"from an earlier, longer run of this folder")
    for epoch in range(1, 6):
        log.checkpoint(epoch, {"spec": {}, "epoch": epoch}, best=epoch == 1)
    assert checkpoints(files.root) == ["epoch-004.pt", "epoch-005.pt", "epoch-009.pt"]
    assert read_checkpoint(files.best)["epoch"] == 1 and read_checkpoint(files.last)["epoch"] == 5
    everything = RunLog(RunFiles(tmp_path / "all"), replace(FAST, keep_checkpoints=0), start_epoch=1)
    for epoch in range(1, 5):
        everything.checkpoint(epoch, {"spec": {}, "epoch": epoch}, best=False)
    assert checkpoints(tmp_path / "all") == [f"epoch-{e:03d}.pt" for e in range(1, 5)]
    log.writer.close(), everything.writer.close()
    with pytest.raises(CMMAError, match=r"--keep-checkpoints must be 0 \(keep all\) or more, not -1"):
        from cmma_cli.train.launch import check_config

        check_config(replace(FAST, keep_checkpoints=-1))


# ------------------------------------------------------------------------------------- 3. projector


def _tsv(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


def test_the_best_models_val_embeddings_feed_tensorboards_projector(runs, sample_ws):
    from cmma_cli.modalities.base import Context
    from cmma_cli.modalities.batches import MaterialSet
    from cmma_cli.model import load_model
    from cmma_cli.train import read_splits

    board = runs["accumulated"] / "tensorboard"
    step = int(metrics(runs["accumulated"])[1]["step"])  # the projector was written when epoch 2 ended
    config = (board / "projector_config.pbtxt").read_text()
    splits = pq.read_table(sample_ws.processed / "splits.parquet").to_pandas()
    val_ids = set(splits.loc[splits["split"] == "val", "material_id"])
    processed = pq.read_table(sample_ws.processed / "materials.parquet",
                              columns=["material_id", "formula", "crystal_system"]).to_pandas().set_index("material_id")
    model, _ = load_model(runs["accumulated"] / "best.pt")
    _, val = read_splits(sample_ws, model.modalities)
    ctx = Context(read_manifest(sample_ws.processed), cache_dir=sample_ws.cache, show_progress=False)
    materials = MaterialSet(val, {m: model.spec["encoders"][m] for m in model.modalities}, ctx)
    batch = materials.collate(np.arange(len(materials)))
    with torch.no_grad():
        features, _ = model(batch["inputs"], batch["masks"])
    ids = val["material_id"].to_pylist()
    for m in ("structure", "text", "xrd"):
        folder = board / f"{step:05d}" / m
        assert f'tensor_name: "{m}:{step:05d}"' in config and f"{step:05d}/{m}/tensors.tsv" in config
        meta, tensors = _tsv(folder / "metadata.tsv"), np.array(_tsv(folder / "tensors.tsv"), dtype=float)
        assert meta[0] == ["material_id", "formula", "crystal_system"]
        assert len(meta) - 1 == len(tensors) == int(batch["masks"][m].sum()) == 30  # every val material has all three
        assert {row[0] for row in meta[1:]} == val_ids
        for mid, formula, system in meta[1:]:
            assert (formula, system) == (processed.loc[mid, "formula"], processed.loc[mid, "crystal_system"])
        # the rows are best.pt's embeddings of those materials
        order = [ids.index(row[0]) for row in meta[1:]]
        np.testing.assert_allclose(tensors, features[m].numpy()[order], atol=1e-4)
    assert not (runs["whole"] / "tensorboard" / "projector_config.pbtxt").exists()  # --no-projector


def test_the_projector_takes_a_seeded_sample_of_at_most_its_cap():
    from cmma_cli.train.projector import PROJECTOR_MATERIALS, projector_rows

    assert PROJECTOR_MATERIALS == 2000
    rows = np.arange(100, 5100)
    some = projector_rows(rows, seed=0)
    assert len(some) == 2000 and len(set(some.tolist())) == 2000 and (np.diff(some) > 0).all()
    assert np.array_equal(some, projector_rows(rows, seed=0)) and set(some) <= set(rows)
    assert np.array_equal(projector_rows(rows[:30], seed=0), rows[:30])


# ------------------------------------------------------------------------------------------ 4. W&B


def test_wandb_without_the_package_is_one_sentence_before_any_work(sample_ws, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(CMMAError, match=r"^--wandb logs to Weights & Biases, whose package is not installed here: "
                                        r"pip install wandb, or train without --wandb\.$"):
        run_train(sample_ws, replace(FAST, wandb=True), run="wb-missing", gpus=0)
    assert not sample_ws.run_dir("wb-missing").exists()


def test_wandb_logs_the_metrics_csv_rows_offline_without_an_api_key(sample_ws, monkeypatch, tmp_path):
    wandb = pytest.importorskip("wandb", reason="wandb is an optional extra (pip install wandb)")
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc key either
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged, modes = [], []
    real_init = wandb.init

    def init(**kwargs):
        modes.append(kwargs.get("mode"))
        run = real_init(**kwargs)
        real_log = run.log
        run.log = lambda data, step=None, **kw: (logged.append((step, dict(data))), real_log(data, step=step, **kw))
        return run

    monkeypatch.setattr(wandb, "init", init)
    run_train(sample_ws, replace(FAST, wandb=True, projector=False), run="wb", gpus=0)
    rows = metrics(sample_ws.run_dir("wb"))
    assert modes == ["offline"]
    assert [step for step, _ in logged] == [int(r["step"]) for r in rows]
    for (_, data), row in zip(logged, rows):
        assert data["train/loss"] == pytest.approx(row["train_loss"]) and data["val/loss"] == pytest.approx(row["val_loss"])
        assert data["val/r1"] == pytest.approx(row["val_r1"]) and data["lr"] == pytest.approx(row["lr"])
    assert list((sample_ws.run_dir("wb") / "wandb").glob("offline-run-*/run-*.wandb"))
