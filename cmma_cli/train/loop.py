"""One rank's training: the data, the model and optimizer, then one epoch at a time; and the objective.

Everything random is seeded from ``cfg.seed`` (the initialisation here, the batches and their sampling
by (seed, epoch, step, rank) in :mod:`cmma_cli.modalities.batches`), and a checkpoint holds the model,
optimizer and scheduler, so a resumed run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import datetime
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmma_cli.config import TrainConfig, as_dict
from cmma_cli.console import console
from cmma_cli.errors import CMMAError
from cmma_cli.loss import MultiModalInfoNCE, pair_name, parse_pairs, property_loss
from cmma_cli.modalities import get_modality
from cmma_cli.modalities.base import Context
from cmma_cli.modalities.batches import BatchDataset, EpochBatches, MaterialSet, to_device
from cmma_cli.model import build_model, read_checkpoint
from cmma_cli.train.data import data_identity, read_splits, usable, with_recipes
from cmma_cli.train.projector import projector_rows, projector_tables
from cmma_cli.train.runlog import RunLog, describe
from cmma_cli.train.validation import validate
from cmma_cli.workspace import RunFiles, Workspace, require_stage

#: How long ranks wait for each other, e.g. while rank 0 embeds every text once for the frozen-text cache.
DIST_TIMEOUT = datetime.timedelta(hours=4)


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
    parent: int = 0  # the launching process's pid (spawned ranks die with it)


#: Steps between progress-bar / TensorBoard updates (reading the loss synchronises a GPU).
LOG_EVERY = 5
BEST_METRICS = {"val_loss": "min", "val_r1": "max"}


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


class MicroBatches(torch.utils.data.Dataset):
    """:class:`BatchDataset` cut into ``accumulate`` micro-batches: a key ``(rows, seed)`` of one optimizer step (the
    ``accumulate * batch_size`` rows of :class:`EpochBatches`) collates as a list of ``accumulate`` batches.

    With ``accumulate`` 1 the one batch is collated exactly as :class:`BatchDataset` does (same random draws); micro-
    batch ``j`` of a step draws from ``(*seed, j)``.
    """

    def __init__(self, materials: MaterialSet, dropout: float = 0.0, accumulate: int = 1):
        self.batches, self.accumulate = BatchDataset(materials, dropout), accumulate

    def __getitem__(self, key: tuple[np.ndarray, tuple[int, ...] | None]) -> list[dict]:
        rows, seed = key
        if self.accumulate == 1:
            return [self.batches[key]]
        return [self.batches[(part, None if seed is None else (*seed, j))]
                for j, part in enumerate(np.array_split(rows, self.accumulate))]


def _stack(parts: list[dict[str, torch.Tensor]], live: int, fresh: dict[str, torch.Tensor], rows: list[int],
           width: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{m: cat over micro-batches}``, micro-batch ``live`` taken from ``fresh`` (with gradient), the others from
    ``parts`` (cached, without); a modality a micro-batch lacks is zeros there (its mask is False)."""
    names = list(dict.fromkeys(m for p in [*parts, fresh] for m in p))
    out = {}
    for m in names:
        blocks = []
        for j, n in enumerate(rows):
            got = (fresh if j == live else parts[j]).get(m)
            blocks.append(got if got is not None else like.new_zeros(n, width))
        out[m] = torch.cat(blocks)
    return out


def accumulated_backward(model: torch.nn.Module, batches: list[dict], loss_fn: MultiModalInfoNCE, objective: str,
                         weight: float, autocast: Any = None, predicting: bool = False,
                         raw: torch.nn.Module | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward of one optimizer step made of ``batches`` (micro-batches): gradients land in ``.grad``.

    One micro-batch: the plain forward and backward. Several (``--accumulate``): open_clip's ``accum_freq`` scheme, so
    the in-batch negatives span every micro-batch, not one at a time as a plain sum of micro-batch losses would:
    first every micro-batch's embeddings (and property predictions) without gradient, cached; then each micro-batch
    again with gradient, the loss taken over all of them (its own fresh rows beside the cached rows of the others),
    and backward. Each pass's gradient is the full-batch loss's gradient through that micro-batch's rows, so their sum
    is the gradient of one step over the whole batch (the logit scale, which every pass uses, counts 1/N per pass).
    Under DDP only the last backward synchronises (``no_sync``). Needs a forward that treats rows independently (no
    batch norm) and is deterministic (no dropout): true of every encoder here.

    Returns the detached loss and its parts (the value over the whole step's batch).
    """
    autocast = autocast if autocast is not None else nullcontext()
    raw = raw if raw is not None else model
    if len(batches) == 1:
        b = batches[0]
        with autocast:
            features, scale, *predictions = model(b["inputs"], b["masks"], with_predictions=predicting)
        loss, parts = objective_loss(objective, weight, loss_fn, features, b["masks"], scale,
                                     predictions[0] if predicting else None, b.get("targets"))
        loss.backward()
        return loss.detach(), {k: v.detach() for k, v in parts.items()}

    n = len(batches)
    rows = [int(b["rows"].shape[0]) for b in batches]
    cached_f, cached_p = [], []
    with torch.no_grad(), autocast:
        for b in batches:
            f, _, *p = raw(b["inputs"], b["masks"], with_predictions=predicting)
            cached_f.append(f)
            cached_p.append(p[0] if predicting else {})
    names = list(dict.fromkeys(m for b in batches for m in b["masks"]))
    masks = {m: torch.cat([b["masks"][m] for b in batches]) for m in names}
    targets = torch.cat([b["targets"] for b in batches]) if predicting else None
    syncing = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    loss = parts = None
    for j, b in enumerate(batches):
        with model.no_sync() if syncing and j < n - 1 else nullcontext():
            with autocast:
                f, scale, *p = model(b["inputs"], b["masks"], with_predictions=predicting)
            like = scale.detach().float()
            features = _stack(cached_f, j, f, rows, raw.embed_dim, like)
            predictions = _stack(cached_p, j, p[0], rows, len(raw.properties), like) if predicting else None
            # the same value, a 1/n share of the gradient: the n passes together give the scale's full gradient
            shared = scale.detach() + (scale - scale.detach()) / n
            loss, parts = objective_loss(objective, weight, loss_fn, features, masks, shared, predictions, targets)
            loss.backward()
    return loss.detach(), {k: v.detach() for k, v in parts.items()}


def improved_best(best: dict[str, Any], row: dict[str, Any], best_metric: str, epoch: int) -> dict[str, Any] | None:
    """The new ``best`` record when this epoch's ``row`` beats it, else None.

    With no val split (or no val figure, e.g. no val material with a known property) the training loss decides.
    """
    name = best_metric if not math.isnan(row.get(best_metric, float("nan"))) else "train_loss"
    metric, lower = row.get(name, float("nan")), BEST_METRICS.get(name, "min") == "min"
    better = not math.isnan(metric) and (
        best["value"] is None or best["metric"] != name or (metric < best["value"] if lower else metric > best["value"]))
    return {"metric": name, "value": float(metric), "epoch": epoch} if better else None


# -------------------------------------------------------------------------------------- the training


def train_rank(plan: Plan, rank: int, local_rank: int) -> dict[str, Any]:
    """Train as rank ``rank`` of ``plan.world`` (joins the process group when there are several)."""
    world = plan.world
    distributed = world > 1
    if distributed and not torch.distributed.is_initialized():
        if plan.device == "cuda":
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group("nccl" if plan.device == "cuda" else "gloo", rank=rank, world_size=world,
                                             timeout=DIST_TIMEOUT)
    device = torch.device(f"cuda:{local_rank}" if plan.device == "cuda" else "cpu")
    if device.type == "cpu" and distributed:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        return _train(plan, Workspace(plan.ws_root), rank, device)
    finally:
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


@dataclass
class Trainer:
    """One rank's model, optimizer, schedule and batches: :meth:`epoch` trains one pass over the train split."""

    cfg: TrainConfig
    model: torch.nn.Module  # the DDP wrapper when there are several ranks
    raw: torch.nn.Module  # the CMMAModel itself
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: torch.utils.data.DataLoader
    sampler: EpochBatches
    loss_fn: MultiModalInfoNCE
    autocast: Any  # bf16 autocast, or a null context
    bf16: bool
    device: torch.device
    world: int
    batch_size: int  # per rank and micro-batch
    accumulate: int  # micro-batches per step
    parts: list[str]  # the parts of the objective logged as train_<part>
    predicting: bool
    step: int = 0

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sampler)

    def temperature(self) -> float:
        return 1 / float(self.raw.scale().detach())

    def epoch(self, epoch: int, log: RunLog | None) -> tuple[dict[str, float], int, float]:
        """Train one epoch: (mean loss and parts per step, materials seen by all ranks, seconds)."""
        cfg, raw, world = self.cfg, self.raw, self.world
        batch_size = self.batch_size * self.accumulate  # per rank and step
        self.sampler.set_epoch(epoch)
        self.model.train()
        sums = {k: torch.zeros((), dtype=torch.float64, device=self.device) for k in ["loss", *self.parts]}
        seen, started = 0, time.perf_counter()
        if log is not None:
            log.begin_epoch(epoch, self.steps_per_epoch, self.temperature())
        for batches in self.loader:
            batches = [to_device(b, self.device) for b in batches]
            self.optimizer.zero_grad(set_to_none=True)
            loss, parts = accumulated_backward(self.model, batches, self.loss_fn, cfg.objective, cfg.predict_weight,
                                               self.autocast, self.predicting, raw)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            raw.clamp_logit_scale()
            self.step += 1
            seen += batch_size * world
            sums["loss"] += loss
            for k in self.parts:
                sums[k] += parts[k]
            if log is not None and (self.step % LOG_EVERY == 0 or seen == self.steps_per_epoch * batch_size * world):
                value, temp = float(loss.detach()), self.temperature()  # syncs a GPU: not every step
                log.step(self.step, seen // (batch_size * world), value, self.scheduler.get_last_lr()[0], temp,
                         seen / (time.perf_counter() - started))
        seconds = time.perf_counter() - started
        if self.predicting and world > 1:  # the property loss is each rank's own (the pair losses are global): average
            packed = torch.stack(list(sums.values()))
            torch.distributed.all_reduce(packed)
            sums = dict(zip(sums, packed / world))
        return {k: float(v) / max(1, self.steps_per_epoch) for k, v in sums.items()}, seen, seconds

    def state(self) -> dict[str, Any]:
        """What a checkpoint holds of the training state (model, optimizer, scheduler, step)."""
        return {"model": self.raw.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step}


def _train(plan: Plan, ws: Workspace, rank: int, device: torch.device) -> dict[str, Any]:
    cfg, spec, world = plan.cfg, plan.spec, plan.world
    master = rank == 0
    processed = require_stage(ws.processed, "preprocess")
    ctx = Context(processed, cache_dir=ws.cache, show_progress=master)
    data = data_identity(ws, processed) if master else {}  # what each checkpoint records of the data it trained on

    # data: rank 0 first (it fills the text cache), then the others
    predict = spec.get("predict")
    train_table, val_table = read_splits(ws, spec["modalities"], properties=predict["properties"] if predict else [])
    recipe_rows = 0
    if cfg.recipes and cfg.objective != "predict":  # recipe rows have no properties to predict
        train_table, recipe_rows = with_recipes(ws, train_table, "train", spec["modalities"])

    def prepare() -> dict[str, MaterialSet]:
        return {"train": MaterialSet(train_table, spec["encoders"], ctx, predict),
                "val": MaterialSet(val_table, spec["encoders"], ctx, predict)}

    sets = prepare() if master else {}
    _barrier(world)
    sets = sets or prepare()
    train_rows, val_rows = usable(sets["train"]), usable(sets["val"])
    batch_size, accumulate = cfg.batch_size, cfg.accumulate
    if len(train_rows) < 2 * world:
        raise CMMAError(f"The train split has {len(train_rows)} materials with two or more of the modalities "
                        f"{','.join(spec['modalities'])}: fetch more data or configure modalities the data has.")
    if len(train_rows) < batch_size * accumulate * world and accumulate > 1:
        accumulate = max(1, len(train_rows) // (batch_size * world))
        if master:
            console.print(f"[yellow]The train split has only {len(train_rows)} usable materials: --accumulate "
                          f"{cfg.accumulate} lowered to {accumulate}.[/]", highlight=False)
    if len(train_rows) < batch_size * world:
        batch_size = len(train_rows) // world
        if master:
            console.print(f"[yellow]The train split has only {len(train_rows)} usable materials: batch size "
                          f"{cfg.batch_size} lowered to {batch_size} per process.[/]", highlight=False)
    if master and len(val_rows) == 0:
        why = ("is empty (rerun `cmma preprocess --force` with a larger --val-fraction)" if val_table.num_rows == 0
               else "has no material with two modalities")
        console.print(f"[yellow]The val split {why}: no validation metrics; best.pt follows the training loss.[/]",
                      highlight=False)

    # recipe rows (at the end of the train table) form batches of their own: a material's batch keeps all its negatives
    kinds = (train_rows >= train_table.num_rows - recipe_rows).astype(np.int64) if recipe_rows else None
    trainer, start_epoch, best = _trainer(plan, cfg, spec, sets["train"], train_rows, batch_size, accumulate, rank,
                                          device, master, kinds)
    step_batch = batch_size * accumulate  # per process and optimizer step

    recipes_used = int(kinds.sum()) if kinds is not None else 0
    log = RunLog(RunFiles(plan.run_dir), cfg, start_epoch) if master else None
    if log is not None:
        log.started(
            f"Training {','.join(spec['modalities'])} ({describe(cfg, trainer.loss_fn, spec)}) on "
            f"{len(train_rows) - recipes_used} train / {len(val_rows)} val materials"
            f"{f' + {recipes_used} synthesis recipes' if recipes_used else ''}: {world} x {device.type}, batch {step_batch}"
            f"{f' ({accumulate} x {batch_size})' if accumulate > 1 else ''}{' per process' if world > 1 else ''}, "
            f"{trainer.steps_per_epoch} steps/epoch, epochs {start_epoch}-"
            f"{cfg.epochs}{', bf16' if trainer.bf16 else ''} -> {plan.run_dir}")

    with log if log is not None else nullcontext():
        for epoch in range(start_epoch, cfg.epochs + 1):
            sums, seen, seconds = trainer.epoch(epoch, log)
            val = validate(trainer.raw, sets["val"], val_rows, step_batch * world, trainer.loss_fn, device,
                           trainer.autocast, rank, cfg.objective, cfg.predict_weight, forward_size=batch_size * world)
            if log is not None:
                row = {"epoch": epoch, "step": trainer.step, "lr": trainer.scheduler.get_last_lr()[0],
                       "temperature": trainer.temperature(),
                       "train_loss": sums["loss"], **{f"train_{k}": sums[k] for k in trainer.parts}, **val,
                       "train_materials_per_s": seen / seconds, "epoch_seconds": seconds}
                log.epoch(row)
                new_best = improved_best(best, row, cfg.best_metric, epoch)
                best = new_best or best
                log.checkpoint(epoch, {
                    "spec": spec, "config": as_dict(cfg), **trainer.state(),
                    "epoch": epoch, "best": best, "metrics": row, "world_size": world,
                    "processed": data["manifest"], "data": data}, best=new_best is not None)
                if val:
                    log.validated(epoch, row)
            _barrier(world)

    if log is None:
        return {}
    if cfg.projector and log.files.best.is_file():
        which = "val" if len(val_rows) else "train"
        _feed_projector(log, trainer, sets[which], val_table if which == "val" else train_table,
                        val_rows if which == "val" else train_rows, batch_size * world, device, ws)
    return log.finish(
        as_dict(cfg), inputs=[ws.processed],
        rows={"train": int(len(train_rows) - recipes_used), "val": int(len(val_rows)), "recipes": recipes_used,
              "epochs": len(log.rows)},
        extra={"spec": spec, "best": best, "world_size": world, "device": device.type},
    )


def _feed_projector(log: RunLog, trainer: Trainer, materials: MaterialSet, table, rows: np.ndarray, batch_size: int,
                    device: torch.device, ws: Workspace) -> None:
    """The best model's embeddings of ``rows`` into TensorBoard's projector (a failure here costs the run nothing)."""
    try:
        trainer.raw.load_state_dict(read_checkpoint(log.files.best)["model"])  # training is over: the best weights
        header, tables = projector_tables(trainer.raw, materials, table, projector_rows(rows, trainer.cfg.seed),
                                          batch_size, device, trainer.autocast, ws.processed)
        log.projector(tables, header, trainer.step)
    except Exception as exc:  # noqa: BLE001 - the checkpoints and metrics are written: never lose the run to this
        console.print(f"[yellow]The embedding projector was not written ({type(exc).__name__}: {exc}); the run is "
                      "complete without it.[/]", highlight=False, soft_wrap=True)


def _trainer(plan: Plan, cfg: TrainConfig, spec: dict[str, Any], train_set: MaterialSet, train_rows: np.ndarray,
             batch_size: int, accumulate: int, rank: int, device: torch.device, master: bool,
             kinds: np.ndarray | None = None) -> tuple[Trainer, int, dict[str, Any]]:
    """The model, optimizer, schedule and loader (seeded here: loading a text model on a cache miss must not shift
    the init), restored from the checkpoint when resuming; with the first epoch to train and the best so far."""
    world = plan.world
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(spec, for_loading=plan.resume is not None).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), betas=(0.9, 0.98), eps=1e-6)
    sampler = EpochBatches(train_rows, batch_size * accumulate, cfg.seed, rank, world, kinds)  # one step's rows
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
        partial = cfg.modality_dropout > 0 or any(not train_set.present(m)[train_rows].all() for m in spec["modalities"])
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=partial)
    loss_fn = MultiModalInfoNCE(parse_pairs(cfg.pairs, spec["modalities"]), cfg.in_modality_negatives)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    workers = cfg.workers if cfg.workers is not None else (4 if device.type == "cuda" else 0)
    loader = torch.utils.data.DataLoader(
        MicroBatches(train_set, cfg.modality_dropout, accumulate), batch_size=None, sampler=sampler, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    predicting = spec.get("predict") is not None
    parts = [pair_name(a, b) for a, b in loss_fn.pairs] if cfg.objective != "predict" else []
    parts += ["predict"] if predicting else []
    trainer = Trainer(cfg, model, raw, optimizer, scheduler, loader, sampler, loss_fn, autocast, bf16, device, world,
                      batch_size, accumulate, parts, predicting, step)
    return trainer, start_epoch, best
