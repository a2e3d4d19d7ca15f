"""The image modality end to end (``cmma[images]``: timm, which needs torchvision), on real images.

Every material of the built-in sample gets its powder XRD as a 2-D detector image (Debye-Scherrer rings,
``tests/detector_images.py``), a seventh of them none; ``cmma preprocess --image-dir`` records them, ``cmma train
--modalities structure,text,image`` aligns a timm ResNet-18 (random weights: no hub here) with the structure and
text encoders, in the process that imported torchvision (which is what broke sentence-transformers beside a
mismatched torch), ``cmma embed`` writes the vectors and ``cmma retrieve --image`` searches with a picture.

These tests need timm and a torchvision built for the torch beside it, which this project's main venv (a CPU
torch 2.13.0, for which PyPI has no torchvision) cannot hold: they run in ``.venv-images`` (``make test-images``,
which CI runs after ``make test``) and skip elsewhere, but for the one sentence a broken pair gets, which runs
everywhere. ``CMMA_REQUIRE_IMAGES=1`` (set by ``make test-images``) turns the skip into a failure, so a broken image
install is never a green run. One training run serves the module: about 3.5 minutes on 2 cores shared with
other jobs (load 6), its epochs 6 to 10 times faster on idle cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

EPOCHS, EMBED_DIM, IMAGE_SIZE = 6, 64, 64


REQUIRED = os.environ.get("CMMA_REQUIRE_IMAGES") == "1"


def _images_problem() -> str | None:
    """Why the image modality cannot run here, or None."""
    missing = [name for name in ("timm", "torchvision") if importlib.util.find_spec(name) is None]
    if missing:
        return f"{' and '.join(missing)} not installed"
    if REQUIRED:  # these tests are to run: import here (a failure fails them anyway)
        try:
            import sentence_transformers, timm, torchvision  # noqa: F401, E401
        except Exception as exc:
            return f"torchvision, timm and sentence-transformers do not import together ({type(exc).__name__}: {exc})"
        return None
    # a torchvision built for another torch fails to import ("operator torchvision::nms does not exist") and
    # takes transformers and sentence-transformers down with it: try the imports in a child, not in this session
    probe = subprocess.run([sys.executable, "-c", "import torchvision, timm, sentence_transformers"],
                           capture_output=True, text=True, timeout=600)
    if probe.returncode:
        lines = probe.stderr.strip().splitlines() or ["no error text"]
        return f"torchvision, timm and sentence-transformers do not import together ({lines[-1][:200]})"
    return None


PROBLEM = _images_problem()
needs_images = pytest.mark.skipif(
    PROBLEM is not None and not REQUIRED,
    reason=f"timm/torchvision not importable here ({PROBLEM}): run `make test-images`",
)


def test_a_torchvision_built_for_another_torch_is_one_sentence_saying_what_to_install(monkeypatch):
    """Runs everywhere: ``import timm`` failing the way PyPI's torchvision does beside a CPU torch 2.13.0."""
    from cmma_cli.errors import CMMAError
    from cmma_cli.modalities.image import _timm

    class BrokenTorchvision:
        def find_spec(self, name, path=None, target=None):
            if name == "timm":
                raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.delitem(sys.modules, "timm", raising=False)
    monkeypatch.setattr(sys, "meta_path", [BrokenTorchvision(), *sys.meta_path])
    with pytest.raises(CMMAError) as err:
        _timm()
    message = " ".join(str(err.value).split())
    assert "torchvision::nms does not exist" in message
    assert "torch 2.N goes with torchvision 0.(N+15)" in message and "make images" in message


@needs_images
def test_torchvision_timm_and_sentence_transformers_import_together():
    assert PROBLEM is None, PROBLEM


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """The sample fetched, given detector images, preprocessed, trained on structure+text+image, embedded (once)."""
    assert PROBLEM is None, PROBLEM
    from detector_images import write_detector_images
    from typer.testing import CliRunner

    from cmma_cli.cli import app
    from cmma_cli.workspace import Workspace

    runner = CliRunner()

    def cmma(*args):
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result

    root = tmp_path_factory.mktemp("images")
    ws, images = root / "ws", root / "images"
    cmma("fetch", "-w", ws, "--source", "sample")
    materials = pd.read_parquet(ws / "raw" / "materials.parquet", columns=["material_id", "structure"])
    without = materials["material_id"].iloc[::7].tolist()
    written = write_detector_images(materials[~materials["material_id"].isin(without)], images, size=IMAGE_SIZE)
    broken = images / f"{without[0]}.png"  # named like a material, but no image
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but the rest is not a PNG")
    stray = images / "not-a-material.png"  # a real image named like no material
    stray.write_bytes(written[0].read_bytes())
    cmma("preprocess", "-w", ws, "--image-dir", images)
    cmma("train", "-w", ws, "--run", "img", "--modalities", "structure,text,image", "--epochs", EPOCHS,
         "--batch-size", 32, "--embed-dim", EMBED_DIM, "--image-size", IMAGE_SIZE, "--no-image-pretrained",
         "--seed", 0)
    cmma("embed", "-w", ws, "--run", "img", "--checkpoint", "last")
    return SimpleNamespace(ws=Workspace(ws), root=ws, images=images, cmma=cmma, run="img",
                           with_image=[p.stem for p in written], without=without, broken=broken, stray=stray,
                           splits=pd.read_parquet(ws / "processed" / "splits.parquet").set_index("material_id")["split"])


def _vectors(run, table: str) -> tuple[list[str], np.ndarray]:
    frame = pd.read_parquet(run.root / "embeddings" / run.run / f"{table}.parquet")
    return frame["material_id"].tolist(), np.stack(frame["embedding"].to_numpy())


@needs_images
def test_preprocess_records_each_image_and_rejects_the_rest(image_run):
    table = pd.read_parquet(image_run.root / "processed" / "materials.parquet", columns=["material_id", "image_path"])
    paths = dict(zip(table["material_id"], table["image_path"]))
    assert len(image_run.with_image) > 200
    for mid in image_run.with_image:
        assert paths[mid] == str((image_run.images / f"{mid}.png").resolve())
    assert all(pd.isna(paths[mid]) for mid in image_run.without)
    rejects = pd.read_parquet(image_run.root / "processed" / "rejects.parquet")
    rejected = dict(zip(rejects["item"], rejects["reason"]))
    assert "not a readable image" in rejected[str(image_run.broken.resolve())]
    assert any(item.endswith("not-a-material.png") for item in rejected)


@needs_images
def test_training_aligns_the_images_with_their_structures(image_run):
    run_dir = image_run.root / "runs" / image_run.run
    config = json.loads((run_dir / "manifest.json").read_text())["config"]
    assert config["image"] == {"model": "resnet18", "pretrained": False, "size": IMAGE_SIZE}
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert len(metrics) == EPOCHS and np.isfinite(metrics["train_loss"]).all()
    assert metrics["train_loss"].iloc[-1] < 0.5 * metrics["train_loss"].iloc[0]  # chance is log(32) = 3.5


@needs_images
def test_embed_writes_one_finite_unit_vector_per_image(image_run):
    ids, vectors = _vectors(image_run, "image")
    assert sorted(ids) == sorted(image_run.with_image)  # materials without an image get no image vector
    assert vectors.shape == (len(image_run.with_image), EMBED_DIM) and vectors.dtype == np.float32
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert np.abs(vectors @ vectors.T - np.eye(len(ids))).max() > 0.05  # not one vector for every image
    structure_ids, _ = _vectors(image_run, "structure")
    assert set(image_run.without) <= set(structure_ids)


@needs_images
def test_the_text_modality_works_in_the_process_that_imported_torchvision(image_run):
    assert "torchvision" in sys.modules and "sentence_transformers" in sys.modules
    ids, vectors = _vectors(image_run, "text")
    structure_ids, _ = _vectors(image_run, "structure")
    assert sorted(ids) == sorted(structure_ids)  # every sample material has a description
    assert vectors.shape == (len(ids), EMBED_DIM) and np.isfinite(vectors).all()


@needs_images
def test_the_trained_image_vectors_find_their_own_structures(image_run):
    ids, images = _vectors(image_run, "image")
    structure_ids, structures = _vectors(image_run, "structure")
    own = np.array([structure_ids.index(mid) for mid in ids])
    scores = images @ structures.T
    ranks = (scores > scores[np.arange(len(ids)), own][:, None]).sum(axis=1) + 1
    train = np.array([image_run.splits[mid] == "train" for mid in ids])
    # trained pairs: chance would be 5 in ~300 in the top 5
    assert (ranks[train] <= 5).mean() > 0.6, np.median(ranks[train])


@needs_images
def test_retrieve_by_image_ranks_the_material_itself_first(image_run, tmp_path):
    from detector_images import write_detector_images

    from cmma_cli.retrieve import Query, Retriever

    trained = [mid for mid in image_run.with_image if image_run.splits[mid] == "train"][:12]
    result = image_run.cmma("retrieve", "-w", image_run.root, "--run", image_run.run, "--image",
                            image_run.images / f"{trained[0]}.png", "--to", "image", "-k", 3, "--json")
    doc = json.loads(result.stdout)
    assert doc["query"]["kind"] == "image" and doc["from"] == "image" and doc["to"] == "image"
    assert doc["index_size"] == len(image_run.with_image) and len(doc["results"]) == 3
    assert doc["results"][0]["material_id"] == trained[0] and doc["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)

    # a new picture of known materials, a noisy measurement (Poisson counts) rather than the picture trained on:
    # itself first among the images for most, and its own structure in the top 5 (the default target) for many
    materials = pd.read_parquet(image_run.root / "raw" / "materials.parquet", columns=["material_id", "structure"])
    fresh = write_detector_images(materials[materials["material_id"].isin(trained)], tmp_path / "measured",
                                  size=IMAGE_SIZE, counts=200)
    retriever = Retriever(image_run.ws, image_run.run)
    firsts = [retriever.query(Query(image=str(p)), target="image", k=1).rows[0]["material_id"] == p.stem for p in fresh]
    assert sum(firsts) >= 8, firsts  # chance: 12 in ~255
    tops = [p.stem in [r["material_id"] for r in retriever.query(Query(image=str(p)), k=5).rows] for p in fresh]
    assert sum(tops) >= 4, tops  # chance: 12 x 5 in ~300


@needs_images
def test_an_unreadable_query_image_is_one_sentence(image_run):
    from typer.testing import CliRunner

    from cmma_cli.cli import app

    result = CliRunner().invoke(app, ["retrieve", "-w", str(image_run.root), "--run", image_run.run,
                                      "--image", str(image_run.broken)])
    assert result.exit_code != 0
    assert "Could not open the image" in " ".join(result.output.split())


@needs_images
def test_pretrained_weights_out_of_reach_fall_back_to_random_ones(monkeypatch, capsys, tmp_path):
    import huggingface_hub.constants
    import torch

    from cmma_cli.modalities.image.encoder import ImageEncoder

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, not after retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # and find no weights cached
    encoder = ImageEncoder("resnet18", pretrained=True)
    assert "starts from random weights" in " ".join(capsys.readouterr().err.split())
    assert encoder({"image": torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)}).shape == (2, encoder.out_dim) == (2, 512)
