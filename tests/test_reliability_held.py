"""Reliability scenarios that held under fault injection (issue #15) and must stay true.

Already covered elsewhere (not repeated here):
- a. resume after a kill matches an uninterrupted run: tests/test_train.py::test_resuming_reproduces_the_uninterrupted_run
  (and the kill tests of tests/test_reliability_runs.py);
- b. Materials Project fetches resume through 5xx bursts, dropped connections and 401s:
  tests/test_fetch_mp.py (failure_midway, synthesis_failure, transient_errors, rejected_key); timeouts, proxy pages
  and long Retry-After waits: tests/test_reliability_fetch.py. Here: truncated bodies, 403 and a killed process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from mp_server import HANG, TEST_API_KEY, TRUNCATE

from cmma_cli.sources import materials_project as mp

ROOT = Path(__file__).resolve().parents[1]


def fetch_args(server, ws: Path, *extra: str) -> list[str]:
    return ["fetch", "--source", "mp", "--endpoint", server.url, "--elements", "O", "--chunk-size", "15",
            "--no-synthesis", "--no-descriptions", "-w", str(ws), *extra]


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(mp, "RETRY_BASE_DELAY_S", 0.01)
    monkeypatch.setattr(mp, "RETRY_ATTEMPTS", 3)


@pytest.fixture
def straight(cli, mp_server, tmp_path) -> pd.DataFrame:
    """raw/materials.parquet of an uninterrupted fetch (the server's log is cleared after it)."""
    ws = tmp_path / "straight"
    assert cli(*fetch_args(mp_server, ws, "--api-key", TEST_API_KEY)).exit_code == 0
    mp_server.reset_log()
    return pd.read_parquet(ws / "raw" / "materials.parquet")


# ------------------------------------------------------------------------- b. Materials Project resumes


def test_mp_fetch_is_exact_through_truncated_bodies(cli, mp_server, straight, tmp_path, fast_retries):
    mp_server.fail("summary", TRUNCATE, first=2, count=2)  # the first chunk comes cut short twice
    mp_server.fail("summary", TRUNCATE, first=6)
    ws = tmp_path / "ws"
    result = cli(*fetch_args(mp_server, ws, "--api-key", TEST_API_KEY))
    assert result.exit_code == 0, result.output
    assert "answer cut short" in " ".join(result.output.split())
    pd.testing.assert_frame_equal(pd.read_parquet(ws / "raw" / "materials.parquet"), straight)


def test_mp_fetch_stops_at_a_403_keeps_the_chunks_and_resumes_exactly(cli, mp_server, straight, tmp_path, fast_retries):
    mp_server.fail("summary", 403, first=4)  # the listing and two chunks, then the key is refused
    ws = tmp_path / "ws"
    result = cli(*fetch_args(mp_server, ws, "--api-key", TEST_API_KEY))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "rejected the API key (HTTP 403)" in " ".join(result.output.split())
    assert mp_server.count("summary") == 4  # a 403 is not retried
    mp_server.reset_log()
    result = cli(*fetch_args(mp_server, ws, "--api-key", TEST_API_KEY))
    assert result.exit_code == 0, result.output
    assert mp_server.count("summary") == -(-len(straight) // 15) - 2  # no listing, no kept chunk
    pd.testing.assert_frame_equal(pd.read_parquet(ws / "raw" / "materials.parquet"), straight)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL")
def test_a_killed_mp_fetch_resumes_to_the_uninterrupted_result(cli, mp_server, straight, tmp_path):
    mp_server.fail("summary", HANG, first=4, count=None)  # two chunks, then the third hangs: kill it there
    ws = tmp_path / "ws"
    env = {**os.environ, "MP_API_KEY": TEST_API_KEY}
    proc = subprocess.Popen([sys.executable, "-m", "cmma_cli", *fetch_args(mp_server, ws)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while mp_server.count("summary") < 4:
            assert proc.poll() is None, "the fetch ended before it could be killed"
            assert time.monotonic() < deadline, "the fetch never reached the third chunk"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    kept = sorted(p.name for p in (ws / "raw" / ".partial" / "mp").glob("materials-*.parquet"))
    assert kept == ["materials-00000.parquet", "materials-00001.parquet"]
    assert not (ws / "raw" / "manifest.json").exists()

    mp_server.heal()
    mp_server.reset_log()
    result = cli(*fetch_args(mp_server, ws, "--api-key", TEST_API_KEY))
    assert result.exit_code == 0, result.output
    asked = mp_server.routed("summary")
    assert len(asked) == -(-len(straight) // 15) - 2 and all("material_ids" in r.params for r in asked)
    pd.testing.assert_frame_equal(pd.read_parquet(ws / "raw" / "materials.parquet"), straight)


# ----------------------------------------------------------------------- c. checkpoints are weights only


class Payload:
    """Unpickling this runs ``exec``: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_a_crafted_pickle_checkpoint_is_refused_and_runs_nothing(embedded_sample, cli, tmp_path):
    ws = embedded_sample.copy(tmp_path / "ws")
    marker = tmp_path / "MARKER"
    state = torch.load(ws.run_dir(embedded_sample.run) / "best.pt", map_location="cpu", weights_only=True)
    crafted = tmp_path / "crafted.pt"
    torch.save({**state, "note": Payload(marker)}, crafted)

    commands = [
        ("embed", "--run", embedded_sample.run, "--checkpoint", crafted, "--force", "-w", ws.root),
        ("train", "--resume", crafted, "--run", "other", "-w", ws.root),
    ]
    for args in commands:
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert "is not a readable cmma checkpoint" in " ".join(result.output.split())
        assert "Traceback" not in result.output
        assert not marker.exists(), f"cmma {args[0]} ran code from the checkpoint"


# ------------------------------------------------------------------------------ d. --filter runs no code


def test_filters_run_no_code(embedded_sample, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "X"
    touch = f"__import__('os').system('touch {marker}')"
    material = pd.read_parquet(embedded_sample.ws.processed / "materials.parquet", columns=["material_id"]).iloc[0, 0]
    attempts = [
        f"{touch}>1",
        f"band_gap>{touch}",
        f"crystal_system=={touch}",
        f"band_gap>1 or {touch}",
        f"band_gap>1;{touch}",
        "__class__.__init__.__globals__>1",
        f"exec(\"open('{marker}','w')\")==1",
        f"band_gap>{{{touch}}}",
        f"@{touch}>1",
    ]
    for expr in attempts:
        result = cli("retrieve", "--material", material, "--filter", expr, "-k", "3", "-w", embedded_sample.ws.root)
        assert "Traceback" not in result.output, expr
        assert result.exit_code in (0, 2), (expr, result.output)
        if result.exit_code == 2:
            assert len(result.output.strip().splitlines()) <= 3, (expr, result.output)  # one (wrapped) sentence
        assert not marker.exists(), f"--filter {expr!r} ran code"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------- e. material ids never escape the workspace


def test_material_ids_that_look_like_paths_write_nothing_outside_the_workspace(embedded_sample, cli, tmp_path, shared_data):
    box = tmp_path / "box"
    ws = embedded_sample.copy(box / "deep" / "ws")
    outside = tmp_path / "outside"
    outside.mkdir()
    rows = pd.read_csv(shared_data / "mp20" / "mp20_sample.csv").head(24)
    evil = ["../../evil", "../../../../evil2", str(outside / "x"), "/tmp/cmma-evil-id", "..\\..\\evil3",
            "a/../../../evil4", "~/evil5", "runs/../../evil6"]
    rows.loc[: len(evil) - 1, "material_id"] = evil
    table = tmp_path / "mine.csv"
    rows[["material_id", "cif", "band_gap", "formation_energy_per_atom"]].to_csv(table, index=False)
    before = {p for p in tmp_path.rglob("*") if ws.root not in p.parents}
    tmp_before = os.path.exists("/tmp/cmma-evil-id")

    steps = [("fetch", "--source", "local", table, "--force", "-w", ws.root), ("preprocess", "--force", "-w", ws.root),
             ("embed", "--run", embedded_sample.run, "--force", "-w", ws.root)]
    for args in steps:
        result = cli(*args)
        assert result.exit_code in (0, 2) and "Traceback" not in result.output, (args, result.output)
    kept = set(pd.read_parquet(ws.raw / "materials.parquet")["material_id"])
    assert kept & set(evil), "the ids should have been read (as plain names)"

    after = {p for p in tmp_path.rglob("*") if ws.root not in p.parents and p != ws.root}
    assert after - before - {table} == set()
    assert os.path.exists("/tmp/cmma-evil-id") == tmp_before
    assert not list(outside.iterdir())
    for p in ws.root.rglob("*"):  # and nothing inside is named after them either
        assert "evil" not in p.name, p


# --------------------------------------------------------------------- f. the API key is never written


def test_the_api_key_appears_in_no_file_output_or_log(cli, mp_server, tmp_path, caplog, fast_retries):
    ws = tmp_path / "ws"
    outputs = []
    base = ["fetch", "--source", "mp", "--endpoint", mp_server.url, "--elements", "O", "--max-sites", "8",
            "--chunk-size", "10", "-w", ws]
    # a fetch that stops during the descriptions (partial files stay), by the environment variable
    mp_server.fail("robocrys", 503, count=None)
    result = cli(*base, env={"MP_API_KEY": TEST_API_KEY})
    outputs.append(result.output)
    assert result.exit_code == 2 and "kept failing" in result.output
    assert list((ws / "raw" / ".partial").rglob("*.parquet"))
    # a rejected key, by the option
    mp_server.heal()
    mp_server.api_key = "another-valid-looking-key-0123456"
    result = cli(*base, "--api-key", TEST_API_KEY)
    outputs.append(result.output)
    assert result.exit_code == 2 and "rejected the API key" in result.output
    # a whole fetch, with recipes and descriptions
    mp_server.api_key = TEST_API_KEY
    result = cli(*base, "--api-key", TEST_API_KEY, "--force")
    outputs.append(result.output)
    assert result.exit_code == 0, result.output
    assert (ws / "raw" / "manifest.json").exists() and mp_server.count("robocrys") > 0

    secret = TEST_API_KEY.encode()
    files = [p for p in ws.rglob("*") if p.is_file()]
    assert files
    for p in files:
        assert secret not in p.read_bytes(), p
    for text in outputs + [r.getMessage() for r in caplog.records]:
        assert TEST_API_KEY not in text
    assert TEST_API_KEY not in json.dumps(json.loads((ws / "raw" / "manifest.json").read_text()))
