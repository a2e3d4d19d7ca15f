"""Shared fixtures: the real data beside the repository, and a CLI runner."""

from __future__ import annotations

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
