"""``cmma train``: contrastive training of the modality encoders on ``processed/``.

Objectives (``--objective``): ``contrastive`` (the multi-modal InfoNCE of :mod:`cmma_cli.loss`),
``predict`` (no alignment: a property head shared by the modalities regresses standardised numeric
properties from each modality's embedding, masked MSE) and ``contrastive+predict`` (the sum, the property
loss weighted by ``predict_weight``). ``val_loss`` is always the objective's loss, so ``best.pt`` follows
it; ``train_predict`` / ``val_predict`` are the property MSEs, and val R@1 is reported for every objective.

One readable loop (in the spirit of nanoGPT's ``train.py``): AdamW with linear warm-up and cosine
decay, gradient clipping, bf16 autocast on a GPU, a checkpoint every epoch (model, optimizer,
scheduler, epoch, config, model spec), validation loss and cross-modal retrieval R@1 each epoch,
``best.pt`` by ``best_metric``, ``metrics.csv``, TensorBoard events and a rich progress bar.

Processes. ``--gpus N`` runs N ranks on this machine (DDP, NCCL); where there is no GPU it runs N CPU
processes on the gloo backend instead, with a warning, which is also how the multi-process path is
exercised without a GPU; ``--gpus 0`` is one CPU process. Under ``torchrun ... -m cmma_cli train``
the ranks come from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and ``--gpus`` is not used.
``batch_size`` is per rank: the loss gathers every rank's features, so the negatives grow with the
number of ranks.

Run folder ``<ws>/runs/<run>/``::

    config.toml            the [train] config (usable with --config)
    checkpoints/epoch-NNN.pt, last.pt, best.pt
    metrics.csv            one row per epoch: losses per pair, R@1 per direction, lr, temperature, speed
    tensorboard/           events (per step and per epoch)
    manifest.json          written when training finishes
"""

from __future__ import annotations

import csv
import datetime
import math
import os
import random
import shutil
import socket
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from cmma_cli.config import TrainConfig, as_dict, flat_dict, validate
from cmma_cli.console import console
from cmma_cli.errors import CMMAError
from cmma_cli.loss import MultiModalInfoNCE, pair_name, parse_pairs, property_loss
from cmma_cli.modalities import check_modalities, get_modality
from cmma_cli.modalities.base import Context
from cmma_cli.modalities.batches import BatchDataset, EpochBatches, MaterialSet, to_device
from cmma_cli.model import build_model, model_spec, read_checkpoint, save_checkpoint, spec_mismatch
from cmma_cli.workspace import Workspace, begin_stage, manifest_hash, require_stage, write_manifest

STAGE = "train"
#: Steps between progress-bar / TensorBoard updates (reading the loss synchronises a GPU).
LOG_EVERY = 5
#: How long ranks wait for each other, e.g. while rank 0 embeds every text once for the frozen-text cache.
DIST_TIMEOUT = datetime.timedelta(hours=4)
BEST_METRICS = {"val_loss": "min", "val_r1": "max"}
PRECISIONS = ("auto", "bf16", "fp32")
OBJECTIVES = ("contrastive", "predict", "contrastive+predict")


# ------------------------------------------------------------------------------------------ the plan


@dataclass
class Plan:
    """Everything a rank needs, decided once (in the launching process or on rank 0), picklable."""

    ws_root: Path
    cfg: TrainConfig
    spec: dict[str, Any]  # the model's spec (the checkpoint's when resuming)
    run_dir: Path
    resume: Path | None
    device: str  # cuda | cpu
    world: int
    port: int = 0


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
    plan = make_plan(ws, cfg, run, resume, gpus, force)
    if plan.world == 1:
        return train_rank(plan, rank=0, local_rank=0)
    plan.port = _free_port()
    try:
        torch.multiprocessing.spawn(_spawned, args=(plan,), nprocs=plan.world, join=True)
    except torch.multiprocessing.ProcessRaisedException as exc:
        lines = [ln for ln in str(exc).splitlines() if "CMMAError: " in ln]
        if lines:
            raise CMMAError(lines[-1].split("CMMAError: ", 1)[1]) from None
        raise
    from cmma_cli.workspace import read_manifest

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


def _check_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its modality list cleaned, or one sentence about the first bad option."""
    cfg = replace(validate(cfg), modalities=check_modalities(cfg.modalities))
    parse_pairs(cfg.pairs, cfg.modalities)
    for name in ("epochs", "batch_size"):
        if getattr(cfg, name) < 1:
            raise CMMAError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(cfg, name)}.")
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


def _latest_run(ws: Workspace) -> Path:
    found = sorted((ws.root / "runs").glob("*/last.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise CMMAError(f"There is no run with a checkpoint in {ws.root / 'runs'} to resume: train once without --resume.")
    return found[-1]


def make_plan(ws: Workspace, cfg: TrainConfig, run: str | None, resume: str | None, gpus: int | None,
              force: bool, torchrun_world: int | None = None) -> Plan:
    """Check the config, the data and the run folder; decide devices; refuse an incompatible resume."""
    cfg = _check_config(cfg)
    manifest = require_stage(ws.processed, "preprocess")
    resume_path = None
    if resume is not None:
        if resume == "latest":
            resume_path = ws.run_dir(run) / "last.pt" if run else _latest_run(ws)
            if not resume_path.exists():
                raise CMMAError(f"Run {run!r} has no checkpoint to resume ({resume_path} is missing): train it first without --resume.")
        else:
            resume_path = Path(resume).expanduser().resolve()
        if run is None:
            parent = resume_path.parent
            run_dir = parent.parent if parent.name == "checkpoints" else parent
        else:
            run_dir = ws.run_dir(run)
    else:
        run_dir = ws.run_dir(run or time.strftime("%Y%m%d-%H%M%S"))

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
        spec = ckpt["spec"]
    elif (run_dir / "checkpoints").exists() or (run_dir / "metrics.csv").exists():
        if not force:
            raise CMMAError(f"Run {run_dir.name!r} already has checkpoints in {run_dir}: pass --resume latest to "
                            "continue it, --force to start it over, or another --run name.")
        for name in ("checkpoints", "tensorboard"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        for name in ("metrics.csv", "last.pt", "best.pt"):
            (run_dir / name).unlink(missing_ok=True)

    if torchrun_world is not None:
        device, world = ("cuda" if torch.cuda.is_available() else "cpu"), torchrun_world
        if device == "cpu":
            console.print(f"[yellow]No GPU found: the {world} torchrun ranks train on the CPU (gloo backend).[/]")
    else:
        device, world, warning = devices(gpus)
        if warning:
            console.print(f"[yellow]{warning}[/]", highlight=False)
    return Plan(ws.root, cfg, spec, run_dir, resume_path, device, world)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, plan: Plan) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(plan.port))
    train_rank(plan, rank=rank, local_rank=rank)


def _torchrun_main(ws, cfg, run, resume, force, rank: int, world: int, local_rank: int) -> dict[str, Any]:
    """Under torchrun: rank 0 makes the plan and hands it (or its error) to every rank."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group(backend, timeout=DIST_TIMEOUT)
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = make_plan(ws, cfg, run, resume, None, force, torchrun_world=world)
        except CMMAError as exc:
            box[0] = str(exc)
    torch.distributed.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        torch.distributed.destroy_process_group()
        raise CMMAError(box[0])
    return train_rank(box[0], rank=rank, local_rank=local_rank)


# ------------------------------------------------------------------------------------------- the data


def read_splits(ws: Workspace, modalities: list[str], columns: list[str] | None = None,
                properties: list[str] = ()) -> tuple[pa.Table, pa.Table]:
    """The processed train and val rows: the columns the modalities read (or just ``columns``), and ``properties``."""
    path, splits_path = ws.processed / "materials.parquet", ws.processed / "splits.parquet"
    if not path.exists() or not splits_path.exists():
        raise CMMAError(f"{ws.processed} lacks materials.parquet or splits.parquet: run `cmma preprocess --force`.")
    if columns is None:
        columns = [c for m in modalities for c in get_modality(m).columns]
    columns = list(dict.fromkeys(["material_id", *columns, *properties]))
    available = pq.ParquetFile(path).schema_arrow.names
    table = pq.read_table(path, columns=[c for c in columns if c in available])
    splits = pq.read_table(splits_path, columns=["material_id", "split"])
    out = []
    for name in ("train", "val"):
        ids = splits.filter(pc.equal(splits["split"], name))["material_id"]
        out.append(table.filter(pc.is_in(table["material_id"], value_set=ids.combine_chunks())))
    return out[0], out[1]


def _usable(materials: MaterialSet) -> np.ndarray:
    """Rows that have at least two configured modalities (a sample with one has no pair to learn from)."""
    return np.flatnonzero(materials.modality_counts() >= 2)


# -------------------------------------------------------------------------------------- optimisation


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: matrices decay, vectors (biases, norms, temperature) do not; an encoder whose modality names
    its own learning rate (a fine-tuned text model) trains at that rate."""
    own = {m: get_modality(m).learning_rate(getattr(cfg, m, None)) for m in model.modalities}
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            parts = name.split(".")
            rate = own.get(parts[1]) if parts[0] == "encoders" else None
            groups.setdefault((rate if rate is not None else cfg.lr, p.ndim >= 2), []).append(p)
    return [{"params": params, "lr": rate, "weight_decay": cfg.weight_decay if decay else 0.0}
            for (rate, decay), params in sorted(groups.items(), key=lambda kv: (kv[0][0] != cfg.lr, kv[0]))]


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``floor`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------- the objective


def objective_loss(objective: str, weight: float, loss_fn: MultiModalInfoNCE, features: dict[str, torch.Tensor],
                   masks: dict[str, torch.Tensor], scale: torch.Tensor, predictions: dict[str, torch.Tensor] | None,
                   targets: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective's loss and its parts: ``{"a-b": pair loss}`` (contrastive) and ``{"predict": property MSE}``."""
    if objective == "contrastive":
        return loss_fn(features, masks, scale)
    prop = property_loss(predictions, masks, targets)
    if objective == "predict":
        # the logit scale stays in the graph (an exact 0: zero gradient, and no weight decay on it), so DDP
        # sees every parameter used and the temperature keeps its initial value
        return prop + scale * 0.0, {"predict": prop}
    total, parts = loss_fn(features, masks, scale)
    return total + weight * prop, {**parts, "predict": prop}


# ----------------------------------------------------------------------------------------- validation


@torch.no_grad()
def evaluate(model, materials: MaterialSet, rows: np.ndarray, batch_size: int, loss_fn: MultiModalInfoNCE,
             device: torch.device, autocast, rank: int = 0, objective: str = "contrastive",
             predict_weight: float = 1.0) -> dict[str, float]:
    """Validation loss (per pair, in chunks of the global batch size) and retrieval R@1 over all of ``rows``.

    Rank 0 computes the features; every rank takes part in the loss's collectives (the others with empty
    batches), so the value does not depend on the number of ranks. A model with a property head also gets
    ``val_predict``, the property MSE over all of ``rows`` (NaN where none has a known property);
    ``val_loss`` is ``objective``'s loss. Returns {} where ``rows`` is empty.
    """
    if len(rows) == 0:
        return {}
    model.eval()
    predicting = model.predictor is not None
    preds: dict[str, list] = {m: [] for m in model.modalities}
    targets: list[torch.Tensor] = []
    feats: dict[str, list] = {m: [] for m in model.modalities}
    masks: dict[str, list] = {m: [] for m in model.modalities}
    sums = {pair_name(a, b): [0.0, 0] for a, b in loss_fn.pairs}
    for chunk in np.array_split(rows, math.ceil(len(rows) / batch_size)):
        if rank == 0:
            batch = to_device(materials.collate(chunk), device)
            with autocast:
                f, scale, *p = model(batch["inputs"], batch["masks"], with_predictions=predicting)
            m_ = batch["masks"]
            if predicting:
                targets.append(batch["targets"].cpu())
                for m in model.modalities:
                    absent = torch.zeros(len(chunk), len(model.properties))
                    preds[m].append(p[0][m].float().cpu() if m in p[0] else absent)
        else:
            f = {m: torch.zeros(0, model.embed_dim, device=device) for m in model.modalities}
            m_ = {m: torch.zeros(0, dtype=torch.bool, device=device) for m in model.modalities}
            scale = model.scale()
        _, parts = loss_fn(f, m_, scale)
        if rank == 0:
            for a, b in loss_fn.pairs:
                n = int((m_[a] & m_[b]).sum())
                sums[pair_name(a, b)][0] += float(parts[pair_name(a, b)]) * n
                sums[pair_name(a, b)][1] += n
            for m in model.modalities:
                feats[m].append(f[m].float().cpu() if m in f else torch.zeros(len(chunk), model.embed_dim))
                masks[m].append(m_[m].cpu())
    model.train()
    if rank != 0:
        return {}
    out: dict[str, float] = {}
    for name, (total, n) in sums.items():
        out[f"val_{name}"] = total / n if n else float("nan")
    contrastive = float(np.nansum([out[f"val_{pair_name(a, b)}"] for a, b in loss_fn.pairs]))
    out["val_loss"] = contrastive
    if predicting:
        mask = {m: torch.cat(v) for m, v in masks.items()}
        t = torch.cat(targets)
        known = (~torch.isnan(t)).any()
        mse = float(property_loss({m: torch.cat(v) for m, v in preds.items()}, mask, t)) if known else float("nan")
        out["val_predict"] = mse
        out["val_loss"] = mse if objective == "predict" else contrastive + predict_weight * mse
    z = {m: torch.cat(v) for m, v in feats.items()}
    mask = {m: torch.cat(v) for m, v in masks.items()}
    r1, chance = [], []
    for a, b in loss_fn.pairs:
        both = mask[a] & mask[b]
        if int(both.sum()) < 2:
            continue
        sim = z[a][both] @ z[b][both].T
        target = torch.arange(sim.shape[0])
        out[f"val_r1_{a}->{b}"] = float((sim.argmax(1) == target).float().mean())
        out[f"val_r1_{b}->{a}"] = float((sim.argmax(0) == target).float().mean())
        r1 += [out[f"val_r1_{a}->{b}"], out[f"val_r1_{b}->{a}"]]
        chance += [1.0 / sim.shape[0]] * 2
    out["val_r1"] = float(np.mean(r1)) if r1 else float("nan")
    out["val_r1_chance"] = float(np.mean(chance)) if chance else float("nan")
    return out


# ---------------------------------------------------------------------------------------- run folder


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config_toml(cfg: TrainConfig, path: Path) -> None:
    """The config as a ``[train]`` table (``None`` values, which TOML cannot hold, are left out)."""
    lines = ["[train]"] + [f"{k} = {_toml_value(v)}" for k, v in flat_dict(cfg).items() if v is not None]
    path.write_text("\n".join(lines) + "\n")


def _write_metrics(rows: list[dict[str, Any]], path: Path) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _read_metrics(path: Path, before_epoch: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open() as fh:
        return [row for row in csv.DictReader(fh) if int(row["epoch"]) < before_epoch]


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f} T {task.fields[temp]:.3f} {task.fields[rate]:.0f} mat/s"),
        TimeElapsedColumn(), console=console,
    )


# -------------------------------------------------------------------------------------- the training


def train_rank(plan: Plan, rank: int, local_rank: int) -> dict[str, Any]:
    """Train as rank ``rank`` of ``plan.world`` (joins the process group when there are several)."""
    cfg, world, spec = plan.cfg, plan.world, plan.spec
    ws = Workspace(plan.ws_root)
    distributed = world > 1
    if distributed and not torch.distributed.is_initialized():
        if plan.device == "cuda":
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group("nccl" if plan.device == "cuda" else "gloo", rank=rank, world_size=world,
                                             timeout=DIST_TIMEOUT)
    device = torch.device(f"cuda:{local_rank}" if plan.device == "cuda" else "cpu")
    if device.type == "cpu" and distributed:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    master = rank == 0
    try:
        return _train(plan, ws, cfg, spec, rank, world, device, master)
    finally:
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _train(plan: Plan, ws: Workspace, cfg: TrainConfig, spec: dict, rank: int, world: int,
           device: torch.device, master: bool) -> dict[str, Any]:
    processed = require_stage(ws.processed, "preprocess")
    ctx = Context(processed, cache_dir=ws.cache, show_progress=master)

    # data: rank 0 first (it fills the text cache), then the others
    predict = spec.get("predict")
    train_table, val_table = read_splits(ws, spec["modalities"], properties=predict["properties"] if predict else [])
    def prepare() -> dict[str, MaterialSet]:
        return {"train": MaterialSet(train_table, spec["encoders"], ctx, predict),
                "val": MaterialSet(val_table, spec["encoders"], ctx, predict)}

    sets = prepare() if master else {}
    _barrier(world)
    sets = sets or prepare()
    train_rows, val_rows = _usable(sets["train"]), _usable(sets["val"])
    batch_size = cfg.batch_size
    if len(train_rows) < 2 * world:
        raise CMMAError(f"The train split has {len(train_rows)} materials with two or more of the modalities "
                        f"{','.join(spec['modalities'])}: fetch more data or configure modalities the data has.")
    if len(train_rows) < batch_size * world:
        batch_size = len(train_rows) // world
        if master:
            console.print(f"[yellow]The train split has only {len(train_rows)} usable materials: batch size "
                          f"{cfg.batch_size} lowered to {batch_size} per process.[/]", highlight=False)
    if master and len(val_rows) == 0:
        console.print("[yellow]The val split has no material with two modalities: no validation metrics; best.pt "
                      "follows the training loss.[/]", highlight=False)

    # model, optimizer, schedule (seeded here: loading a text model on a cache miss must not shift the init)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(spec, for_loading=plan.resume is not None).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), betas=(0.9, 0.98), eps=1e-6)
    sampler = EpochBatches(train_rows, batch_size, cfg.seed, rank, world)
    steps_per_epoch = len(sampler)
    total_steps, warmup = cfg.epochs * steps_per_epoch, max(1, round(cfg.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, total_steps, cfg.min_lr_ratio))
    start_epoch, step, best = 1, 0, {"metric": cfg.best_metric, "value": None, "epoch": None}
    if plan.resume is not None:
        ckpt = read_checkpoint(plan.resume)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, step, best = ckpt["epoch"] + 1, ckpt["step"], ckpt["best"]
        if master:
            console.print(f"Resuming {plan.run_dir.name} from {plan.resume} (epoch {ckpt['epoch']}).", highlight=False)
    raw = model
    if world > 1:
        partial = cfg.modality_dropout > 0 or any(not sets["train"].present(m)[train_rows].all() for m in spec["modalities"])
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=partial)
    loss_fn = MultiModalInfoNCE(parse_pairs(cfg.pairs, spec["modalities"]), cfg.in_modality_negatives)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    workers = cfg.workers if cfg.workers is not None else (4 if device.type == "cuda" else 0)
    loader = torch.utils.data.DataLoader(
        BatchDataset(sets["train"], cfg.modality_dropout), batch_size=None, sampler=sampler, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0, prefetch_factor=4 if workers else None)

    # run folder, metrics, TensorBoard (rank 0)
    run_dir = plan.run_dir
    metrics_path = run_dir / "metrics.csv"
    rows: list[dict[str, Any]] = []
    writer = None
    if master:
        begin_stage(run_dir)
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        write_config_toml(cfg, run_dir / "config.toml")
        rows = _read_metrics(metrics_path, start_epoch)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))
        console.print(
            f"Training {','.join(spec['modalities'])} ({_describe(cfg, loss_fn, spec)}) on "
            f"{len(train_rows)} train / {len(val_rows)} val materials: {world} x {device.type}, batch {batch_size}"
            f"{' per process' if world > 1 else ''}, {steps_per_epoch} steps/epoch, epochs {start_epoch}-{cfg.epochs}"
            f"{', bf16' if bf16 else ''} -> {run_dir}", highlight=False)

    predicting = predict is not None
    pairs = [pair_name(a, b) for a, b in loss_fn.pairs] if cfg.objective != "predict" else []
    pairs += ["predict"] if predicting else []  # the parts of the objective logged as train_<part>
    with (_progress() if master else nullcontext()) as bar:
        for epoch in range(start_epoch, cfg.epochs + 1):
            sampler.set_epoch(epoch)
            model.train()
            sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in ["loss", *pairs]}
            seen, started = 0, time.perf_counter()
            task = bar.add_task(f"epoch {epoch}/{cfg.epochs}", total=steps_per_epoch, loss=float("nan"),
                                temp=1 / float(raw.scale().detach()), rate=0.0) if master else None
            for batch in loader:
                batch = to_device(batch, device)
                with autocast:
                    features, scale, *predictions = model(batch["inputs"], batch["masks"], with_predictions=predicting)
                loss, parts = objective_loss(cfg.objective, cfg.predict_weight, loss_fn, features, batch["masks"], scale,
                                             predictions[0] if predicting else None, batch.get("targets"))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                raw.clamp_logit_scale()
                step += 1
                seen += batch_size * world
                sums["loss"] += loss.detach()
                for k in pairs:
                    sums[k] += parts[k].detach()
                if master and (step % LOG_EVERY == 0 or seen == steps_per_epoch * batch_size * world):
                    value, temp = float(loss.detach()), 1 / float(raw.scale().detach())  # syncs a GPU: not every step
                    rate = seen / (time.perf_counter() - started)
                    bar.update(task, completed=seen // (batch_size * world), loss=value, temp=temp, rate=rate)
                    writer.add_scalar("train/loss", value, step)
                    writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
                    writer.add_scalar("train/temperature", temp, step)
            seconds = time.perf_counter() - started
            if predicting and world > 1:  # the property loss is each rank's own (the pair losses are global): average
                packed = torch.stack(list(sums.values()))
                torch.distributed.all_reduce(packed)
                sums = dict(zip(sums, packed / world))
            sums = {k: float(v) / max(1, steps_per_epoch) for k, v in sums.items()}
            val = evaluate(raw, sets["val"], val_rows, batch_size * world, loss_fn, device, autocast, rank,
                           cfg.objective, cfg.predict_weight)
            if master:
                row = {"epoch": epoch, "step": step, "lr": scheduler.get_last_lr()[0],
                       "temperature": 1 / float(raw.scale().detach()),
                       "train_loss": sums["loss"], **{f"train_{k}": sums[k] for k in pairs}, **val,
                       "train_materials_per_s": seen / seconds, "epoch_seconds": seconds}
                rows.append(row)
                _write_metrics(rows, metrics_path)
                for key, v in row.items():
                    if key.startswith("val_") and isinstance(v, float) and not math.isnan(v):
                        writer.add_scalar(f"val/{key[4:]}", v, step)
                writer.add_scalar("train/epoch_loss", row["train_loss"], step)
                writer.flush()
                # no val split (or no val figure, e.g. no val material with a known property): the training loss decides
                name = cfg.best_metric if not math.isnan(row.get(cfg.best_metric, float("nan"))) else "train_loss"
                metric, lower = row.get(name, float("nan")), BEST_METRICS.get(name, "min") == "min"
                improved = not math.isnan(metric) and (
                    best["value"] is None or best["metric"] != name or (metric < best["value"] if lower else metric > best["value"]))
                if improved:
                    best = {"metric": name, "value": float(metric), "epoch": epoch}
                path = save_checkpoint(run_dir / "checkpoints" / f"epoch-{epoch:03d}.pt", {
                    "spec": spec, "config": as_dict(cfg), "model": raw.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "epoch": epoch, "step": step, "best": best, "metrics": row, "world_size": world,
                    "processed": manifest_hash(ws.processed)})
                shutil.copyfile(path, run_dir / "last.pt")
                if improved:
                    shutil.copyfile(path, run_dir / "best.pt")
                if val:
                    console.print(f"  epoch {epoch}: train loss {row['train_loss']:.4f}, val loss {val['val_loss']:.4f}, "
                                  + (f"val property MSE {val['val_predict']:.4f}, " if "val_predict" in val else "")
                                  + f"val R@1 {val['val_r1']:.3f} (chance {val['val_r1_chance']:.3f})", highlight=False)
            _barrier(world)

    if not master:
        return {}
    writer.close()
    manifest = write_manifest(
        run_dir, STAGE, as_dict(cfg), inputs=[ws.processed],
        rows={"train": int(len(train_rows)), "val": int(len(val_rows)), "epochs": len(rows)},
        extra={"spec": spec, "best": best, "world_size": world, "device": device.type,
               "first": rows[0] if rows else {}, "last": rows[-1] if rows else {}},
    )
    _summary(run_dir, rows, best)
    return manifest


def _describe(cfg: TrainConfig, loss_fn: MultiModalInfoNCE, spec: dict[str, Any]) -> str:
    """The objective in words: the contrastive pairs and/or the predicted properties."""
    parts = [] if cfg.objective == "predict" else [", ".join(pair_name(a, b) for a, b in loss_fn.pairs)]
    if "predict" in spec:
        weight = f" x {cfg.predict_weight:g}" if parts and cfg.predict_weight != 1 else ""
        parts.append(f"predict {', '.join(spec['predict']['properties'])}{weight}")
    return " + ".join(parts)


def _summary(run_dir: Path, rows: list[dict[str, Any]], best: dict[str, Any]) -> None:
    from rich.table import Table

    if not rows:
        return
    table = Table(title=f"{run_dir.name}: learning curve (first and last epoch)", title_justify="left")
    keys = [k for k in ("train_loss", "val_loss", "val_predict", "val_r1", "val_r1_chance", "temperature") if k in rows[-1]]
    table.add_column("epoch", justify="right")
    for k in keys:
        table.add_column(k, justify="right")
    for row in (rows[0], rows[-1]) if len(rows) > 1 else rows[:1]:
        table.add_row(str(row["epoch"]), *(f"{float(row[k]):.4f}" for k in keys))
    console.print(table)
    console.print(f"best.pt: epoch {best['epoch']} ({best['metric']} {best['value']}); checkpoints, metrics.csv and "
                  f"TensorBoard events in {run_dir}.", highlight=False)
