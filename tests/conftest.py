"""Shared fixtures: the real data beside the repository, and a CLI runner."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real published materials data); tests using it skip when it is absent."""
    if not (SHARED_DATA / "mp20" / "mp20_sample.csv").exists():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (it sits beside the repository in CI)")
    return SHARED_DATA


@pytest.fixture
def cli():
    """Run ``cmma ...`` in-process: ``cli("fetch", "-w", path)`` returns the click Result."""
    from cmma_cli.cli import app

    runner = CliRunner()

    def invoke(*args: str, env: dict[str, str] | None = None):
        return runner.invoke(app, [str(a) for a in args], env=env, catch_exceptions=False)

    return invoke


@pytest.fixture(scope="session")
def mp_content(shared_data):
    """What the loopback Materials Project serves: 200 mp20 materials, their recipes, robocrys texts (built once)."""
    from mp_server import build_content

    return build_content(200)


@pytest.fixture
def mp_server(mp_content):
    """A fresh loopback Materials Project API (own request log and failure switches) on 127.0.0.1."""
    from mp_server import LoopbackMP

    server = LoopbackMP(mp_content).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def embedded_sample(tmp_path_factory):
    """The built-in sample fetched, preprocessed, trained briefly (4 epochs, small dims, text frozen) and embedded.

    One run for the whole session (about a minute on 2 cores): tests read it and must not change it; a
    test that writes copies the workspace first (``embedded_sample.copy(folder)`` returns the copy's Workspace).
    Returns a namespace: ``ws``, ``run``, ``dim``, ``train`` (the TrainConfig), ``embed`` (the manifest) and ``copy``.
    """
    from types import SimpleNamespace

    from cmma_cli.config import EmbedConfig, FetchConfig, PreprocessConfig, TrainConfig
    from cmma_cli.embed import run_embed
    from cmma_cli.fetch import run_fetch
    from cmma_cli.preprocess.pipeline import run_preprocess
    from cmma_cli.train import run_train
    from cmma_cli.workspace import Workspace

    ws = Workspace(tmp_path_factory.mktemp("embedded-sample"))
    train = TrainConfig(modalities=["structure", "text", "xrd"], epochs=4, batch_size=32, lr=3e-3, embed_dim=32,
                        proj_hidden=64, structure_hidden=32, structure_layers=2, num_rbf=16, xrd_channels=8,
                        xrd_out_dim=32, seed=0)
    run_fetch(ws, FetchConfig(source="sample"), api_key=None)
    run_preprocess(ws, PreprocessConfig())
    run_train(ws, train, run="sample")
    manifest = run_embed(ws, EmbedConfig(run="sample"))
    def copy(folder: Path) -> Workspace:
        return Workspace(Path(shutil.copytree(ws.root, folder)))

    return SimpleNamespace(ws=ws, run="sample", dim=train.embed_dim, train=train, embed=manifest, copy=copy)
