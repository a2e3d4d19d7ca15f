"""Starting a training run: the plan (config, data and resume checks, the model spec, the devices) and the ranks.

:func:`run_train` decides everything once, in the launching process (or on rank 0 under torchrun), as a
picklable :class:`Plan`, then runs :func:`~cmma_cli.train.loop.train_rank` in this process, in ``--gpus N``
spawned processes, or in each torchrun rank.
"""

from __future__ import annotations

import math
import os
import socket
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from cmma_cli.config import TrainConfig, validate
from cmma_cli.console import console
from cmma_cli.errors import CMMAError
from cmma_cli.loss import parse_pairs
from cmma_cli.modalities import check_modalities, get_modality
from cmma_cli.modalities.base import Context
from cmma_cli.model import model_spec, read_checkpoint, spec_mismatch
from cmma_cli.processes import die_with_parent
from cmma_cli.train.data import data_identity, read_splits
from cmma_cli.train.loop import DIST_TIMEOUT, Plan, train_rank
from cmma_cli.train.runlog import import_wandb
from cmma_cli.workspace import RunFiles, Workspace, manifest_hash, read_manifest, require_stage, stage_lock

STAGE = "train"


def run_train(ws: Workspace, cfg: TrainConfig, run: str | None = None, resume: str | None = None,
              gpus: int | None = None, force: bool = False) -> dict[str, Any]:
    """Train a model on ``ws``'s processed data into ``runs/<run>/``; returns the run's manifest.

    ``run``: the run name (default: a timestamp; with ``resume="latest"``, the newest run).
    ``resume``: ``"latest"`` or a checkpoint path, to continue a run. ``gpus``: ranks on this machine
    (None: one GPU if there is one, else the CPU; 0: the CPU; N: N GPUs, or N CPU processes without a
    GPU). ``force``: start ``run`` over, deleting its checkpoints and metrics.
    """
    env = torchrun_env()
    if env is not None:
        return _torchrun_main(ws, cfg, run, resume, force, *env)
    with ExitStack() as held:  # the run's write lock, from the first look at its folder to the end of training
        plan = make_plan(ws, cfg, run, resume, gpus, force, held=held)
        if plan.world == 1:
            return train_rank(plan, rank=0, local_rank=0)
        plan.port, plan.parent = _free_port(), os.getpid()
        try:
            torch.multiprocessing.spawn(_spawned, args=(plan,), nprocs=plan.world, join=True)
        except torch.multiprocessing.ProcessRaisedException as exc:
            lines = [ln for ln in str(exc).splitlines() if "CMMAError: " in ln]
            if lines:
                raise CMMAError(lines[-1].split("CMMAError: ", 1)[1]) from None
            raise
        return read_manifest(plan.run_dir) or {}


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when launched by torchrun, else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    return None


def devices(gpus: int | None) -> tuple[str, int, str | None]:
    """(device kind, number of ranks, warning or None) for ``--gpus``."""
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus is not None and gpus < 0:
        raise CMMAError(f"--gpus must be 0 (CPU) or a positive number of GPUs, not {gpus}.")
    if gpus is None:
        if available:
            return "cuda", 1, None
        return "cpu", 1, "No GPU found: training on the CPU (fine for the built-in sample, slow for large data)."
    if gpus == 0:
        return "cpu", 1, None
    if available == 0:
        what = "one CPU process" if gpus == 1 else f"{gpus} CPU processes (gloo backend)"
        return "cpu", gpus, f"No GPU found: --gpus {gpus} runs {what} instead."
    if gpus > available:
        raise CMMAError(f"--gpus {gpus} asks for more GPUs than the {available} this machine has: pass --gpus {available} or fewer.")
    return "cuda", gpus, None


def check_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its modality list cleaned, or one sentence about the first bad option."""
    cfg = replace(validate(cfg), modalities=check_modalities(cfg.modalities))
    parse_pairs(cfg.pairs, cfg.modalities)
    for name in ("epochs", "batch_size", "accumulate"):
        if getattr(cfg, name) < 1:
            raise CMMAError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(cfg, name)}.")
    if cfg.wandb:
        import_wandb()  # one sentence (pip install wandb) before any work when it is missing
    if cfg.keep_checkpoints < 0:
        raise CMMAError(f"--keep-checkpoints must be 0 (keep all) or more, not {cfg.keep_checkpoints}.")
    if cfg.lr <= 0:
        raise CMMAError(f"--lr must be positive, not {cfg.lr}.")
    for m in cfg.modalities:
        rate = get_modality(m).learning_rate(getattr(cfg, m, None))
        if rate is not None and rate <= 0:
            raise CMMAError(f"--{m}-lr must be positive, not {rate}.")
    if not 0 <= cfg.modality_dropout < 1:
        raise CMMAError(f"--modality-dropout is a probability in [0, 1), not {cfg.modality_dropout}.")
    if cfg.workers is not None and cfg.workers < 0:
        raise CMMAError(f"--workers must be 0 or more, not {cfg.workers}.")
    if not (cfg.predict_weight > 0 and math.isfinite(cfg.predict_weight)):
        raise CMMAError(f"--predict-weight must be a positive number, not {cfg.predict_weight}.")
    if cfg.predict_properties and not cfg.predicts:
        raise CMMAError("--predict-properties needs a predict objective: add --objective predict or "
                        "contrastive+predict, or leave it out.")
    return cfg


def resume_target(ws: Workspace, run: str | None, resume: str | None) -> tuple[Path | None, RunFiles]:
    """(the checkpoint to resume from or None, the run folder) for ``--run`` and ``--resume``.

    The run folder is always ``<ws>/runs/<run>/``: a checkpoint from outside the workspace continues in ``--run``,
    or in a new run (a timestamp) when there is none. ``--resume latest`` takes the run's ``last.pt``, or where that
    is missing or unreadable (a kill mid-write) its newest readable epoch checkpoint, and says so.
    """
    if resume is None:
        return None, ws.run_files(run or time.strftime("%Y%m%d-%H%M%S"))
    if resume == "latest":
        if run:
            files = ws.run_files(run)
        else:
            path = ws.latest_checkpoint()
            if path is None:
                raise CMMAError(f"There is no run with a checkpoint in {ws.root / 'runs'} to resume: train once "
                                "without --resume.")
            files = RunFiles.of_checkpoint(path)
        return resumable_checkpoint(files), files
    path = Path(resume).expanduser().resolve()
    if run is not None:
        return path, ws.run_files(run)
    owner = RunFiles.of_checkpoint(path)
    if ws.owns_run(owner.root):
        return path, owner
    files = ws.run_files(time.strftime("%Y%m%d-%H%M%S"))
    console.print(f"{path} lies outside {ws.root / 'runs'}: training continues from it in the new run {files.name!r} "
                  "(pass --run NAME to choose the name).", highlight=False, soft_wrap=True)
    return path, files


def resumable_checkpoint(files: RunFiles) -> Path:
    """``files.last``, or where it is missing or unreadable the newest readable epoch checkpoint (with a warning)."""
    if files.last.is_file():
        try:
            read_checkpoint(files.last)
            return files.last
        except CMMAError:
            problem = "unreadable (cut short?)"
    else:
        problem = "missing"
    for path in reversed(files.epoch_checkpoints()):
        try:
            read_checkpoint(path)
        except CMMAError:
            continue
        console.print(f"[yellow]{files.last} is {problem}: resuming from {path.name}, the newest readable epoch "
                      "checkpoint.[/]", highlight=False, soft_wrap=True)
        return path
    if problem == "missing" and not files.epoch_checkpoints():
        raise CMMAError(f"Run {files.name!r} has no checkpoint to resume ({files.last} is missing): train it first "
                        "without --resume.")
    raise CMMAError(f"Run {files.name!r} has no readable checkpoint to resume ({files.last} is {problem} and no "
                    f"checkpoints/epoch-NNN.pt can be read): start it over with --force.")


def data_change(ckpt: dict[str, Any], ws: Workspace, manifest: dict[str, Any]) -> str | None:
    """What changed in ``processed/`` since ``ckpt`` was written (in words), or None when it trains on the same data."""
    if ckpt.get("processed") == manifest_hash(ws.processed):
        return None
    then = ckpt.get("data")
    if not then:  # a checkpoint that records only the manifest's hash
        return "processed/ was rebuilt since, and the checkpoint does not record which split it trained on"
    now = data_identity(ws, manifest)
    changed = []
    if then.get("splits") != now["splits"]:
        changed.append("the train/val/test split")
    if then.get("config_hash") != now["config_hash"]:
        old, new = then.get("config") or {}, now["config"]
        keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        said = ", ".join(f"{k} {old.get(k)} -> {new.get(k)}" for k in keys[:4] if not isinstance(new.get(k), dict))
        changed.append(f"the preprocess settings ({said})" if said else "the preprocess settings")
    if then.get("inputs") != now["inputs"]:
        changed.append("the raw data (a new fetch)")
    return ", ".join(changed) or None


def make_plan(ws: Workspace, cfg: TrainConfig, run: str | None, resume: str | None, gpus: int | None,
              force: bool, torchrun_world: int | None = None, held: ExitStack | None = None) -> Plan:
    """Check the config, the data and the run folder; decide devices; refuse an incompatible resume.

    ``held``: where the run's write lock is kept (taken before the run folder is looked at; a run another process
    is writing is refused); the caller holds it until training ends. None: no lock (the caller took it).
    """
    cfg = check_config(cfg)
    manifest = require_stage(ws.processed, "preprocess")
    resume_path, files = resume_target(ws, run, resume)
    if held is not None:
        held.enter_context(stage_lock(files.root, f"Run {files.name!r}"))

    # the spec measures the graphs' mean neighbour count (and the properties' train mean and std for a
    # predict objective); the rest of the data is read by the ranks
    properties = list(manifest.get("properties", [])) if cfg.predicts else []
    measured = [c for m in cfg.modalities for c in get_modality(m).spec_columns()]
    train_table, _ = read_splits(ws, cfg.modalities, columns=[*measured, *properties])
    ctx = Context(manifest, cache_dir=ws.cache)
    wanted = model_spec(cfg, train_table, ctx)
    spec = wanted
    if resume_path is not None:
        ckpt = read_checkpoint(resume_path)
        diffs = spec_mismatch(ckpt["spec"], wanted)
        if diffs:
            raise CMMAError(
                f"The checkpoint {resume_path} was trained with other settings ({'; '.join(diffs)}): resume with "
                "the settings it was trained with, or start a new run with --run NAME."
            )
        if ckpt["epoch"] >= cfg.epochs:
            raise CMMAError(f"The checkpoint {resume_path} has already trained {ckpt['epoch']} epochs: pass --epochs "
                            f"above {ckpt['epoch']} to train further.")
        changed = data_change(ckpt, ws, manifest)
        if changed and not cfg.resume_any_data:
            raise CMMAError(
                f"processed/ changed since the checkpoint {resume_path} was written ({changed}), so resuming would "
                "score it on materials it trained on: start a new run with --run NAME, or pass --resume-any-data to "
                "continue anyway.")
        if changed:
            console.print(f"[yellow]Resuming on changed processed data ({changed}) as --resume-any-data asks: val "
                          "and test figures may include materials it trained on.[/]", highlight=False, soft_wrap=True)
        spec = ckpt["spec"]
    elif files.has_training():
        if not force:
            raise CMMAError(f"Run {files.name!r} already has checkpoints in {files.root}: pass --resume latest to "
                            "continue it, --force to start it over, or another --run name.")
        files.clear_training()

    if torchrun_world is not None:
        device, world = ("cuda" if torch.cuda.is_available() else "cpu"), torchrun_world
        if device == "cpu":
            console.print(f"[yellow]No GPU found: the {world} torchrun ranks train on the CPU (gloo backend).[/]")
    else:
        device, world, warning = devices(gpus)
        if warning:
            console.print(f"[yellow]{warning}[/]", highlight=False)
    return Plan(ws.root, cfg, spec, files.root, resume_path, device, world)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, plan: Plan) -> None:
    die_with_parent(plan.parent)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(plan.port))
    train_rank(plan, rank=rank, local_rank=rank)


def _torchrun_main(ws, cfg, run, resume, force, rank: int, world: int, local_rank: int) -> dict[str, Any]:
    """Under torchrun: rank 0 makes the plan (holding the run's lock until it ends) and hands it (or its error) to
    every rank."""
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by the torchrun agent: die with it
        die_with_parent(os.getppid())
    with ExitStack() as held:
        return _torchrun_ranks(ws, cfg, run, resume, force, rank, world, local_rank, held)


def _torchrun_ranks(ws, cfg, run, resume, force, rank: int, world: int, local_rank: int,
                    held: ExitStack) -> dict[str, Any]:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group(backend, timeout=DIST_TIMEOUT)
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = make_plan(ws, cfg, run, resume, None, force, torchrun_world=world, held=held)
        except CMMAError as exc:
            box[0] = str(exc)
    torch.distributed.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        torch.distributed.destroy_process_group()
        raise CMMAError(box[0])
    return train_rank(box[0], rank=rank, local_rank=local_rank)
