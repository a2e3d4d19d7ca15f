"""Runs and stages stay whole under kills, second writers, moved splits and stray paths (fault-injection findings).

Each test names the finding it guards: resuming on a new split (3), one writer per run or stage (4), runs only
inside the workspace (5), a bad embed checkpoint (7), atomic last.pt / best.pt with a fallback (8), and ranks
that die with their parent, leaving no finished manifest (2).
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cmma_cli.config import EmbedConfig, EvaluateConfig, PreprocessConfig, TrainConfig
from cmma_cli.errors import CMMAError
from cmma_cli.model import read_checkpoint
from cmma_cli.train import make_plan, run_train
from cmma_cli.workspace import (
    MANIFEST,
    RunFiles,
    Workspace,
    config_hash,
    lock_path,
    output_files,
    read_manifest,
    stage_lock,
    write_json,
)

#: test_train.py's small config (the sample's three modalities, text frozen and cached).
FAST = TrainConfig(
    modalities=["structure", "text", "xrd"], epochs=2, batch_size=32, lr=3e-3, warmup_epochs=1.0,
    embed_dim=32, proj_hidden=64, structure_encoder="schnet", structure_hidden=32, structure_layers=2, num_rbf=16,
    xrd_channels=8, xrd_out_dim=32, seed=0,
)
FAST_FLAGS = ["--modalities", "structure,text,xrd", "--batch-size", "16", "--embed-dim", "32", "--proj-hidden", "64",
              "--structure-encoder", "schnet", "--structure-hidden", "32", "--structure-layers", "2", "--num-rbf", "16",
              "--xrd-channels", "8", "--xrd-out-dim", "32"]
REPO = Path(__file__).resolve().parents[1]


def metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fresh_ws(source: Workspace, folder: Path, runs: bool = True) -> Workspace:
    """A copy of ``source``'s processed data and text cache (and its runs, when ``runs``)."""
    ws = Workspace(folder)
    for part in ("processed", "cache", *(("runs",) if runs else ())):
        if (source.root / part).exists():
            shutil.copytree(source.root / part, ws.root / part)
    return ws


@pytest.fixture(scope="module")
def trained(embedded_sample, tmp_path_factory) -> Workspace:
    """The sample's processed data with run 'a' trained for 2 epochs (tests copy it before they change it)."""
    ws = fresh_ws(embedded_sample.ws, tmp_path_factory.mktemp("reliability") / "ws", runs=False)
    run_train(ws, FAST, run="a", gpus=0)
    return ws


class Holder:
    """Another process holding a stage's write lock (as a second `cmma` would), until :meth:`stop` or :meth:`kill`."""

    def __init__(self, stage_dir: Path):
        code = ("import sys, time; from pathlib import Path; from cmma_cli.workspace import stage_lock\n"
                "with stage_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(stage_dir)], stdout=subprocess.PIPE, text=True,
                                     cwd=REPO)
        assert self.proc.stdout.readline().strip() == "held"
        self.pid = self.proc.pid

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    stop = kill


def refusal(what: str, holder: Holder) -> str:
    return rf"{what} is being written by another cmma process \(pid {holder.pid} on {socket.gethostname()}, started "


# ------------------------------------------------------------------------------------------ finding 3


def resplit(ws: Workspace, seed: int) -> None:
    """What `cmma preprocess --force --seed SEED` does to processed/: the same materials, a new split, a new manifest."""
    path = ws.processed / "splits.parquet"
    table = pq.read_table(path)
    labels = table["split"].to_pylist()
    rotated = labels[len(labels) // 3:] + labels[: len(labels) // 3]  # train materials move into val/test
    pq.write_table(table.set_column(table.schema.get_field_index("split"), "split", pa.array(rotated, pa.string())),
                   path)
    manifest = read_manifest(ws.processed)
    manifest["config"]["seed"] = seed
    manifest["config_hash"] = config_hash(manifest["config"])
    manifest["created"] = "2099-01-01T00:00:00.000+00:00"
    manifest["files"] = output_files(ws.processed)  # what a rebuild records: the new split file's size and digest
    write_json(manifest, ws.processed / MANIFEST)


def test_resume_refuses_a_rebuilt_split_unless_told(trained, tmp_path):
    ws = fresh_ws(trained, tmp_path / "ws")
    # processed/ rebuilt with the same settings (only the manifest's time differs): resuming is fine
    manifest = read_manifest(ws.processed)
    write_json({**manifest, "created": "2099-01-01T00:00:00.000+00:00"}, ws.processed / MANIFEST)
    run_train(ws, replace(FAST, epochs=3), run="a", resume="latest", gpus=0)
    assert [r["epoch"] for r in metrics(ws.run_dir("a"))] == ["1", "2", "3"]

    resplit(ws, seed=7)
    with pytest.raises(CMMAError, match=r"processed/ changed since the checkpoint .*last.pt was written \(the "
                                        r"train/val/test split, the preprocess settings \(seed 0 -> 7\)\).*start a new "
                                        r"run with --run NAME, or pass --resume-any-data"):
        run_train(ws, replace(FAST, epochs=4), run="a", resume="latest", gpus=0)
    assert [r["epoch"] for r in metrics(ws.run_dir("a"))] == ["1", "2", "3"]  # nothing trained
    assert read_manifest(ws.run_dir("a")) is not None  # the finished run is still finished
    run_train(ws, replace(FAST, epochs=4, resume_any_data=True), run="a", resume="latest", gpus=0)
    assert [r["epoch"] for r in metrics(ws.run_dir("a"))] == ["1", "2", "3", "4"]


# ------------------------------------------------------------------------------------------ finding 4


def test_a_second_writer_of_a_run_is_refused_at_once_naming_the_holder(trained, tmp_path):
    ws = fresh_ws(trained, tmp_path / "ws")
    files = ws.run_files("a")
    before = {p.name: digest(p) for p in [files.last, files.best, files.metrics, files.root / MANIFEST]}
    holder = Holder(files.root)
    try:
        for kwargs in ({"run": "a"}, {"run": "a", "force": True}, {"run": "a", "resume": "latest"}, {"resume": "latest"}):
            with pytest.raises(CMMAError, match=refusal("Run 'a'", holder) + r".*wait for it to finish or stop it"):
                run_train(ws, replace(FAST, epochs=3), gpus=0, **kwargs)
        assert {p.name: digest(p) for p in [files.last, files.best, files.metrics, files.root / MANIFEST]} == before
    finally:
        holder.kill()
    # the killed holder left its lock file behind: it does not stay stuck
    assert lock_path(files.root).exists()
    with stage_lock(files.root, "Run 'a'"):
        pass


def test_a_second_writer_of_a_stage_is_refused_and_a_dead_holders_lock_is_free(embedded_sample, tmp_path):
    from cmma_cli import api
    from cmma_cli.embed import run_embed
    from cmma_cli.preprocess.pipeline import run_preprocess

    ws = embedded_sample.copy(tmp_path / "ws")
    run = embedded_sample.run
    kept = digest(ws.embeddings_dir(run) / "unified.parquet")
    cases = [
        (ws.processed, "The stage folder .*processed", lambda: run_preprocess(ws, PreprocessConfig(), force=True)),
        (ws.embeddings_dir(run), f"The embeddings of run '{run}'",
         lambda: run_embed(ws, EmbedConfig(run=run), force=True)),
        (ws.reports_dir(run), f"The report of run '{run}'",
         lambda: api.evaluate(ws, EvaluateConfig(run=run, sections=["retrieval"]), force=True)),
    ]
    for stage_dir, what, command in cases:
        holder = Holder(stage_dir)
        try:
            with pytest.raises(CMMAError, match=refusal(what, holder)):
                command()
        finally:
            holder.kill()
        with stage_lock(stage_dir):  # released by the kernel when its holder died
            pass
    assert read_manifest(ws.processed) is not None and read_manifest(ws.embeddings_dir(run)) is not None
    assert digest(ws.embeddings_dir(run) / "unified.parquet") == kept


def other_process_takes(stage: Path) -> str:
    """What another process gets when it tries to take ``stage``'s lock: "taken", or the refusal."""
    code = ("import sys; from pathlib import Path; from cmma_cli.workspace import stage_lock\n"
            "from cmma_cli.errors import CMMAError\n"
            "try:\n    stage_lock(Path(sys.argv[1])).__enter__(); print('taken')\nexcept CMMAError as e:\n    print(e)\n")
    return subprocess.run([sys.executable, "-c", code, str(stage)], capture_output=True, text=True, cwd=REPO).stdout


def test_locks_are_reentrant_in_one_process_and_released_after(tmp_path):
    from cmma_cli.workspace import begin_stage, write_manifest

    stage = tmp_path / "runs" / "r"
    with stage_lock(stage):
        with stage_lock(stage):
            begin_stage(stage)  # the caller's lock: no second one
        begin_stage(stage)
        write_manifest(stage, "train", {})  # does not release the caller's lock
        assert f"pid {os.getpid()} on {socket.gethostname()}" in other_process_takes(stage)
    assert other_process_takes(stage).strip() == "taken"
    begin_stage(stage)  # taken by begin_stage (a stage that did not lock itself)...
    assert f"pid {os.getpid()} on {socket.gethostname()}" in other_process_takes(stage)
    write_manifest(stage, "train", {})  # ...and released when it finishes
    assert other_process_takes(stage).strip() == "taken"


# ------------------------------------------------------------------------------------------ finding 5


def test_run_names_with_a_path_are_refused_and_nothing_is_written_outside(trained, tmp_path):
    from cmma_cli.embed import run_embed

    ws = fresh_ws(trained, tmp_path / "ws")
    before = sorted(p.name for p in tmp_path.iterdir())
    for name in ("../..", "..", "../escape", "a/b", ".hidden", "a\\b"):
        with pytest.raises(CMMAError, match="is not a plain folder name .*pass --run with a name that has no '/'"):
            run_train(ws, FAST, run=name, gpus=0)
        with pytest.raises(CMMAError, match="is not a plain folder name"):
            run_embed(ws, EmbedConfig(run=name))
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert sorted(p.name for p in (ws.root / "runs").iterdir() if not p.name.startswith(".")) == ["a"]


def test_resuming_from_a_checkpoint_outside_the_workspace_continues_in_a_run_inside(trained, tmp_path, capfd):
    ws = fresh_ws(trained, tmp_path / "ws")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copyfile(ws.run_files("a").epoch_checkpoint(1), outside / "last.pt")
    (outside / MANIFEST).write_text('{"unrelated": true}\n')
    (outside / "metrics.csv").write_text("not,ours\n")
    before = {p.name: digest(p) for p in outside.iterdir()}

    manifest = run_train(ws, FAST, resume=str(outside / "last.pt"), gpus=0)
    assert {p.name: digest(p) for p in outside.iterdir()} == before  # nothing outside touched
    assert "lies outside" in capfd.readouterr().err.replace("\n", " ")
    runs = [p for p in (ws.root / "runs").iterdir() if p.is_dir() and p.name != "a"]
    assert len(runs) == 1 and read_manifest(runs[0]) == manifest
    assert [r["epoch"] for r in metrics(runs[0])] == ["2"]
    # and it continued exactly where epoch 1 left off
    assert float(metrics(runs[0])[0]["train_loss"]) == pytest.approx(float(metrics(ws.run_dir("a"))[1]["train_loss"]),
                                                                    rel=1e-6)
    # with --run, it continues in that run (inside the workspace)
    run_train(ws, FAST, run="named", resume=str(outside / "last.pt"), gpus=0)
    assert [r["epoch"] for r in metrics(ws.run_dir("named"))] == ["2"]


# ------------------------------------------------------------------------------------------ finding 7


def test_a_bad_embed_checkpoint_or_a_failure_keeps_the_working_embeddings(embedded_sample, tmp_path, monkeypatch):
    import cmma_cli.embed as embed

    ws = embedded_sample.copy(tmp_path / "ws")
    run = embedded_sample.run
    out = ws.embeddings_dir(run)
    (out / "inputs" / "kept-by-the-user").mkdir(parents=True, exist_ok=True)
    (out / "inputs" / "kept-by-the-user" / "keep.txt").write_text("user embeddings")
    before = {p.name: digest(p) for p in out.iterdir() if p.is_file()}

    junk = ws.run_dir(run) / "checkpoints" / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CMMAError, match="is not a readable cmma checkpoint"):
        embed.run_embed(ws, EmbedConfig(run=run, checkpoint=str(junk)), force=True)
    assert {p.name: digest(p) for p in out.iterdir() if p.is_file()} == before

    def broken(*args, **kwargs):
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(embed, "embed_processed", broken)
    with pytest.raises(RuntimeError, match="killed mid-way"):
        embed.run_embed(ws, EmbedConfig(run=run), force=True)
    assert {p.name: digest(p) for p in out.iterdir() if p.is_file()} == before
    assert not list(out.parent.glob(f".{run}.new-*"))  # no staging folder left
    monkeypatch.undo()

    manifest = embed.run_embed(ws, EmbedConfig(run=run, checkpoint="last"), force=True)
    assert manifest["checkpoint"]["name"] == "last" and read_manifest(out) == manifest
    assert (out / "inputs" / "kept-by-the-user" / "keep.txt").read_text() == "user embeddings"
    assert not list(out.parent.glob(f".{run}.new-*"))
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(before)


# ------------------------------------------------------------------------------------------ finding 8


def test_last_and_best_are_replaced_whole_even_when_the_copy_is_cut(tmp_path, monkeypatch):
    import cmma_cli.train.runlog as runlog

    files = RunFiles(tmp_path / "runs" / "r")
    log = SimpleNamespace(files=files, prune=lambda epoch: [])  # RunLog.checkpoint's only other need
    runlog.RunLog.checkpoint(log, 1, {"spec": {}, "epoch": 1}, best=True)
    good = digest(files.last), digest(files.best)

    def cut(src, dst, *args, **kwargs):  # a kill half-way through the copy
        Path(dst).write_bytes(Path(src).read_bytes()[:10])
        raise KeyboardInterrupt

    monkeypatch.setattr(runlog.shutil, "copyfile", cut)
    with pytest.raises(KeyboardInterrupt):
        runlog.RunLog.checkpoint(log, 2, {"spec": {}, "epoch": 2}, best=True)
    assert (digest(files.last), digest(files.best)) == good
    assert read_checkpoint(files.last)["epoch"] == 1
    assert sorted(p.name for p in files.root.iterdir() if p.is_file()) == ["best.pt", "last.pt"]  # no temporary left


def test_resume_latest_falls_back_to_the_newest_readable_epoch_checkpoint(trained, tmp_path, capfd):
    ws = fresh_ws(trained, tmp_path / "ws")
    files = ws.run_files("a")
    files.last.write_bytes(files.last.read_bytes()[:1000])  # what a kill mid-copy used to leave
    files.epoch_checkpoint(2).write_bytes(b"")  # and an epoch checkpoint cut short as well
    with pytest.raises(CMMAError, match="already has checkpoints .* --resume latest"):
        run_train(ws, FAST, run="a", gpus=0)
    run_train(ws, FAST, resume="latest", gpus=0)  # the newest run; epoch 1 is the newest readable checkpoint
    said = capfd.readouterr().err.replace("\n", " ")
    assert "last.pt is unreadable (cut short?): resuming from epoch-001.pt" in said
    assert [r["epoch"] for r in metrics(files.root)] == ["1", "2"]
    assert read_checkpoint(files.last)["epoch"] == 2 and read_manifest(files.root) is not None

    files.last.unlink()
    for path in files.epoch_checkpoints():
        path.write_bytes(b"junk")
    with pytest.raises(CMMAError, match="has no readable checkpoint to resume .* start it over with --force"):
        run_train(ws, replace(FAST, epochs=3), run="a", resume="latest", gpus=0)


# ------------------------------------------------------------------------------------------ finding 2


def test_starting_a_run_over_unfinishes_it_first(trained, tmp_path):
    ws = fresh_ws(trained, tmp_path / "ws")
    assert read_manifest(ws.run_dir("a")) is not None
    make_plan(ws, FAST, "a", None, 0, force=True)  # what --force does before training (then, say, a kill)
    assert not ws.run_files("a").has_training()
    assert read_manifest(ws.run_dir("a")) is None  # no finished manifest over a run with no checkpoints


def _children(pid: int) -> list[int]:
    psutil = pytest.importorskip("psutil")
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(pids: list[int]) -> list[int]:
    psutil = pytest.importorskip("psutil")
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kills a process tree the Linux way")
def test_killing_a_two_rank_cpu_run_kills_its_ranks_and_leaves_no_finished_manifest(trained, tmp_path):
    pytest.importorskip("psutil")
    ws = fresh_ws(trained, tmp_path / "ws", runs=False)
    run_dir = ws.run_dir("k")
    env = {**os.environ, "CMMA_WORKSPACE": str(ws.root)}
    proc = subprocess.Popen([sys.executable, "-m", "cmma_cli", "train", "--run", "k", "--gpus", "2", "--epochs", "500",
                             *FAST_FLAGS], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks: list[int] = []
    try:
        deadline = time.time() + 240
        while not (run_dir / "metrics.csv").exists():  # the ranks are training
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.time() < deadline, "training did not start within 4 minutes"
            time.sleep(0.5)
        ranks = _children(proc.pid)
        assert len(ranks) >= 2
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        deadline = time.time() + 30
        while _alive(ranks) and time.time() < deadline:
            time.sleep(0.5)
        assert not _alive(ranks), "the ranks outlived their parent"
        assert read_manifest(run_dir) is None
        # the run's lock died with its holder: the run can be resumed at once
        with stage_lock(run_dir, "Run 'k'"):
            pass
    finally:
        for pid in [proc.pid, *_alive(ranks)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(30)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kills a process tree the Linux way")
def test_a_rank_dies_with_its_parent_even_when_it_does_not_act_on_sigint():
    """torch's spawn arms SIGINT as the parent-death signal, which a rank busy in a collective (or ignoring SIGINT)
    may not act on; :func:`die_with_parent` makes it SIGKILL."""
    child = ("import signal, sys, time\n"
             "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
             "import torch.multiprocessing as tm; tm._prctl_pr_set_pdeathsig(signal.SIGINT)  # what torch's spawn arms\n"
             "from cmma_cli.processes import die_with_parent\n"
             "die_with_parent(int(sys.argv[1])); print('armed', flush=True); time.sleep(600)\n")
    parent = ("import os, subprocess, sys, time\n"
              "c = subprocess.Popen([sys.executable, '-c', sys.argv[1], str(os.getpid())], stdout=subprocess.PIPE, text=True)\n"
              "assert c.stdout.readline().strip() == 'armed'\n"
              "print(c.pid, flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", parent, child], stdout=subprocess.PIPE, text=True, cwd=REPO)
    rank = int(proc.stdout.readline())
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        deadline = time.time() + 15
        while _alive([rank]) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive([rank]), "the child outlived its parent"
    finally:
        for pid in _alive([rank]):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("pool", ["fetch", "preprocess"])
def test_worker_processes_die_with_a_killed_command(pool):
    """Two fetch workers outlived a killed `cmma fetch` by 50 minutes: the pools of fetch (structure readers) and
    preprocess (featurizers, under forkserver) now end with the command."""
    parent = ("import os, sys, time, multiprocessing\n"
              "from concurrent.futures import ProcessPoolExecutor\n"
              "from cmma_cli.processes import die_with_starter\n"
              "def pid(_): return os.getpid()\n"
              "if __name__ == '__main__':\n"
              "    if sys.argv[1] == 'fetch':\n"
              "        pool = ProcessPoolExecutor(max_workers=2, initializer=die_with_starter)\n"
              "    else:\n"
              "        ctx = multiprocessing.get_context('forkserver')\n"
              "        ctx.set_forkserver_preload(['cmma_cli.forkserver_guard'])  # as preprocess/stream.py does\n"
              "        pool = ProcessPoolExecutor(max_workers=2, mp_context=ctx, initializer=die_with_starter)\n"
              "    pids = set(pool.map(pid, range(50)))\n"
              "    print(' '.join(map(str, pids)), flush=True); time.sleep(600)\n")
    script = Path(tempfile.mkdtemp()) / "parent.py"
    script.write_text(parent)
    proc = subprocess.Popen([sys.executable, str(script), pool], stdout=subprocess.PIPE, text=True, cwd=REPO)
    workers = [int(p) for p in proc.stdout.readline().split()]
    try:
        assert workers and _alive(workers)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        deadline = time.time() + 20
        while _alive(workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(workers), "a worker outlived the killed command"
    finally:
        for pid in _alive(workers):
            os.kill(pid, signal.SIGKILL)


def test_a_killed_writers_temporary_files_are_cleared_when_the_stage_starts_again(tmp_path):
    """A SIGKILLed writer cannot delete its own half-written temporary file: the next writer of the stage does."""
    from cmma_cli.workspace import begin_stage, write_manifest

    stage = tmp_path / "processed"
    stage.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = stage / f".materials.parquet.tmp-{int(dead.stdout)}"
    orphan.write_bytes(b"half a table")
    nested = stage / "sub" / f".x.json.tmp-{int(dead.stdout)}"
    nested.parent.mkdir()
    nested.write_text("{")
    mine = stage / f".other.parquet.tmp-{os.getpid()}"  # a live writer's file is not touched
    mine.write_bytes(b"being written")
    begin_stage(stage)
    write_manifest(stage, "preprocess", {})
    assert not orphan.exists() and not nested.exists() and mine.exists()
