"""``cmma train`` on the built-in sample: it learns, it resumes exactly, it refuses what it must, it runs 2 ranks."""

from __future__ import annotations

import csv
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cmma_cli.config import TrainConfig, load_toml_section
from cmma_cli.errors import CMMAError
from cmma_cli.model import load_model, read_checkpoint
from cmma_cli.train import lr_factor, run_train
from cmma_cli.workspace import Workspace, read_manifest

#: Small enough for a 2-core CPU, big enough to learn: the three default modalities, text frozen (cached).
FAST = TrainConfig(
    modalities=["structure", "text", "xrd"], epochs=8, batch_size=32, lr=3e-3, warmup_epochs=1.0,
    embed_dim=32, proj_hidden=64, structure_hidden=32, structure_layers=2, num_rbf=16,
    xrd_channels=8, xrd_out_dim=32, seed=0,
)


@pytest.fixture(scope="module")
def sample_ws(embedded_sample, tmp_path_factory) -> Workspace:
    """The built-in sample, preprocessed (real structures, robocrys descriptions, computed XRD), in a workspace
    of this module's own: a copy of the session's ``processed/`` and frozen-text cache, with no runs yet."""
    ws = Workspace(tmp_path_factory.mktemp("sample-ws"))
    shutil.copytree(embedded_sample.ws.processed, ws.processed)
    shutil.copytree(embedded_sample.ws.root / "cache", ws.root / "cache")
    return ws


def metrics(run_dir: Path) -> list[dict[str, float]]:
    with (run_dir / "metrics.csv").open() as fh:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def trained(sample_ws) -> Path:
    """One short training run on the sample (shared by the tests that read its outputs)."""
    run_train(sample_ws, replace(FAST), run="learn")
    return sample_ws.run_dir("learn")


def test_training_lowers_the_validation_loss_and_retrieves_far_above_chance(trained):
    rows = metrics(trained)
    assert [r["epoch"] for r in rows] == list(range(1, FAST.epochs + 1))
    first, last = rows[0], rows[-1]
    assert last["val_loss"] < 0.85 * first["val_loss"]  # 10.12 -> 8.02 on this machine
    assert last["val_r1"] > 5 * last["val_r1_chance"]  # 0.24 against 1/30
    assert last["val_r1"] > first["val_r1"]
    for pair in ("structure-text", "structure-xrd", "text-xrd"):
        assert f"train_{pair}" in last and f"val_{pair}" in last
    assert last["val_r1_structure->text"] > 5 * last["val_r1_chance"]


def test_a_run_folder_holds_config_checkpoints_best_metrics_and_tensorboard(trained, sample_ws):
    assert load_toml_section(trained / "config.toml", "train", TrainConfig) == {
        k: v for k, v in vars(FAST).items() if v is not None}
    assert sorted(p.name for p in (trained / "checkpoints").glob("*.pt")) == [f"epoch-{e:03d}.pt" for e in range(1, 9)]
    rows = metrics(trained)
    best_epoch = min(rows, key=lambda r: r["val_loss"])["epoch"]
    assert read_checkpoint(trained / "best.pt")["epoch"] == best_epoch
    assert read_checkpoint(trained / "last.pt")["epoch"] == FAST.epochs
    assert list((trained / "tensorboard").glob("events.out.tfevents.*"))
    manifest = read_manifest(trained)
    assert manifest["stage"] == "train" and "preprocess" in manifest["inputs"]
    assert manifest["best"]["epoch"] == best_epoch and manifest["rows"]["epochs"] == FAST.epochs


def test_a_checkpoint_alone_rebuilds_the_trained_model(trained):
    model, ckpt = load_model(trained / "best.pt")
    spec = ckpt["spec"]
    assert spec["modalities"] == ["structure", "text", "xrd"] and spec["embed_dim"] == 32
    assert spec["encoders"]["text"]["model"] == "all-MiniLM-L6-v2"
    assert spec["encoders"]["xrd"]["length"] == 1601
    assert ckpt["config"]["batch_size"] == 32
    # the frozen sentence model is not in the checkpoint, yet the model embeds raw text
    assert not any(k.startswith("encoders.text.") for k in ckpt["model"])
    z = model.embed("text", {"embedding": model.encoders["text"].encode(["Si is diamond structured."])})
    assert z.shape == (1, 32) and torch.allclose(z.norm(dim=1), torch.ones(1))


def test_resuming_reproduces_the_uninterrupted_run(sample_ws):
    cfg = replace(FAST, epochs=2)
    run_train(sample_ws, cfg, run="straight")
    straight = sample_ws.run_dir("straight")
    # a second run that stopped after epoch 1 of the same config, continued from its checkpoint
    run_train(sample_ws, cfg, run="resumed", resume=str(straight / "checkpoints" / "epoch-001.pt"))
    resumed = sample_ws.run_dir("resumed")
    a, b = metrics(straight)[1], metrics(resumed)[0]
    assert b["epoch"] == 2
    for key in ("train_loss", "val_loss", "val_r1", "temperature", "lr"):
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key
    wa, wb = read_checkpoint(straight / "last.pt")["model"], read_checkpoint(resumed / "last.pt")["model"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    # --resume latest continues the newest run
    run_train(sample_ws, replace(cfg, epochs=3), resume="latest")
    assert [r["epoch"] for r in metrics(resumed)] == [2, 3]


def test_resume_refuses_a_checkpoint_of_another_model(trained, sample_ws):
    last = str(trained / "last.pt")
    with pytest.raises(CMMAError, match=r"was trained with other settings \(modalities structure,text,xrd -> structure,text"):
        run_train(sample_ws, replace(FAST, modalities=["structure", "text"], epochs=20), resume=last, run="x")
    with pytest.raises(CMMAError, match=r"embed_dim 32 -> 64\): resume with the settings it was trained with"):
        run_train(sample_ws, replace(FAST, embed_dim=64, epochs=20), resume=last, run="x")
    with pytest.raises(CMMAError, match=r"structure architecture schnet -> painn"):
        run_train(sample_ws, replace(FAST, structure_encoder="painn", epochs=20), resume=last, run="x")
    with pytest.raises(CMMAError, match="has already trained 8 epochs: pass --epochs above 8"):
        run_train(sample_ws, FAST, resume=last, run="x")


def test_other_mistakes_get_one_sentence(trained, sample_ws, tmp_path):
    with pytest.raises(CMMAError, match="already has checkpoints .* --resume latest .* --force"):
        run_train(sample_ws, FAST, run="learn")
    with pytest.raises(CMMAError, match="No finished `preprocess` output .* run `cmma preprocess` first"):
        run_train(Workspace(tmp_path), FAST)
    with pytest.raises(CMMAError, match="is not a readable cmma checkpoint"):
        (tmp_path / "junk.pt").write_text("not a checkpoint")
        run_train(sample_ws, FAST, resume=str(tmp_path / "junk.pt"), run="x")
    with pytest.raises(CMMAError, match="--gpus must be 0"):
        run_train(sample_ws, FAST, run="x", gpus=-1)
    with pytest.raises(CMMAError, match="Unknown modality 'spectra'"):
        run_train(sample_ws, replace(FAST, modalities=["structure", "spectra"]), run="x")
    with pytest.raises(CMMAError, match="--best-metric must be one of val_loss, val_r1"):
        run_train(sample_ws, replace(FAST, best_metric="r5"), run="x")
    assert not sample_ws.run_dir("x").exists()


def test_learning_rate_warms_up_then_follows_a_cosine():
    assert lr_factor(0, 10, 100, 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 10, 100, 0.01) == pytest.approx(0.01)


@pytest.mark.slow
def test_two_cpu_processes_train_exactly_like_one_with_the_doubled_batch(sample_ws, capfd):
    cfg = replace(FAST, epochs=2, batch_size=16, xrd_augment=False)  # augmentation draws differ per rank
    run_train(sample_ws, cfg, run="ddp", gpus=2)
    assert "No GPU found: --gpus 2 runs 2 CPU processes (gloo backend) instead." in capfd.readouterr().err.replace("\n", " ")
    run_train(sample_ws, replace(cfg, batch_size=32), run="single", gpus=0)
    ddp, single = metrics(sample_ws.run_dir("ddp")), metrics(sample_ws.run_dir("single"))
    assert read_manifest(sample_ws.run_dir("ddp"))["world_size"] == 2
    for a, b in zip(ddp, single):
        for key in ("train_loss", "val_loss", "val_r1", "temperature"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key


def test_training_copes_with_missing_modalities_and_modality_dropout(sample_ws, tmp_path):
    """Descriptions kept for one material in three only: pairs use the samples that have both."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ws = Workspace(tmp_path / "ws")
    shutil.copytree(sample_ws.processed, ws.processed)
    shutil.copytree(sample_ws.root / "cache", ws.root / "cache")
    table = pq.read_table(ws.processed / "materials.parquet")
    keep = [i % 3 == 0 for i in range(table.num_rows)]
    descriptions = [d if k else None for d, k in zip(table["description"].to_pylist(), keep)]
    table = table.set_column(table.schema.get_field_index("description"), "description", pa.array(descriptions, pa.string()))
    pq.write_table(table, ws.processed / "materials.parquet")

    cfg = replace(FAST, modalities=["structure", "text", "xrd"], epochs=2, batch_size=16, modality_dropout=0.3)
    run_train(ws, cfg, run="sparse")
    rows = metrics(ws.run_dir("sparse"))
    splits = pq.read_table(ws.processed / "splits.parquet").to_pandas()
    val_ids = set(splits.loc[splits["split"] == "val", "material_id"])
    with_text = sum(1 for mid, d in zip(table["material_id"].to_pylist(), descriptions) if mid in val_ids and d)
    for row in rows:
        assert all(row[k] == row[k] and row[k] > 0 for k in ("train_loss", "train_structure-text", "val_loss"))
    # retrieval in a text pair ranks only the val materials that have a description: its chance level is 1/with_text
    assert 3 < with_text < 20
    assert rows[-1]["val_r1_chance"] == pytest.approx((4 / with_text + 2 / 30) / 6)
    assert read_manifest(ws.run_dir("sparse"))["rows"]["val"] == 30  # every val material still has structure + xrd
