"""What rank 0 records of a run: ``config.toml``, ``metrics.csv``, checkpoints, TensorBoard events, and what it prints.

Every file goes through :func:`cmma_cli.workspace.atomic`; the run folder's layout is
:class:`cmma_cli.workspace.RunFiles`.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from cmma_cli.config import TrainConfig, flat_dict
from cmma_cli.console import console
from cmma_cli.errors import CMMAError
from cmma_cli.loss import MultiModalInfoNCE, pair_name
from cmma_cli.workspace import RunFiles, atomic, begin_stage, write_manifest, write_text


# ------------------------------------------------------------------------------------------ files


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_toml(cfg: TrainConfig) -> str:
    """The config as a ``[train]`` table (``None`` values, which TOML cannot hold, are left out)."""
    lines = ["[train]"] + [f"{k} = {_toml_value(v)}" for k, v in flat_dict(cfg).items() if v is not None]
    return "\n".join(lines) + "\n"


def write_config_toml(cfg: TrainConfig, path: Path) -> Path:
    """Write :func:`config_toml` of ``cfg`` to ``path`` (usable with ``cmma train --config``)."""
    return write_text(config_toml(cfg), path)


def write_metrics(rows: list[dict[str, Any]], path: Path) -> Path:
    """``rows`` as a CSV table whose columns are every key, in order of first appearance."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with atomic(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_metrics(path: Path, before_epoch: int) -> list[dict[str, Any]]:
    """The rows of ``metrics.csv`` for the epochs before ``before_epoch`` (what a resumed run keeps)."""
    if not path.exists():
        return []
    with path.open() as fh:
        return [row for row in csv.DictReader(fh) if int(row["epoch"]) < before_epoch]


def import_wandb():
    """The ``wandb`` module, or one sentence saying how to install it (it is not a dependency of cmma)."""
    try:
        import wandb
    except ImportError:
        raise CMMAError("--wandb logs to Weights & Biases, whose package is not installed here: pip install wandb, "
                        "or train without --wandb.") from None
    return wandb


def _wandb_key() -> bool:
    """Whether a W&B API key is at hand (``WANDB_API_KEY`` or ``~/.netrc``, where ``wandb login`` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def start_wandb(files: RunFiles, cfg: TrainConfig):
    """A W&B run for ``files`` (id from the run folder, so a resumed run continues it), offline unless ``WANDB_MODE``
    says otherwise or an API key is at hand; its files under ``<run>/wandb/``."""
    wandb = import_wandb()
    mode = None if os.environ.get("WANDB_MODE") or _wandb_key() else "offline"
    run_id = f"{files.name}-{hashlib.sha1(str(files.root.resolve()).encode()).hexdigest()[:8]}"
    run_id = "".join(c if c.isalnum() or c in "-_" else "-" for c in run_id)
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "cmma"), name=files.name, id=run_id, resume="allow",
                      dir=str(files.root), config=flat_dict(cfg), mode=mode, job_type="train")


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f} T {task.fields[temp]:.3f} {task.fields[rate]:.0f} mat/s"),
        TimeElapsedColumn(), console=console,
    )


def describe(cfg: TrainConfig, loss_fn: MultiModalInfoNCE, spec: dict[str, Any]) -> str:
    """The objective in words: the contrastive pairs and/or the predicted properties."""
    parts = [] if cfg.objective == "predict" else [", ".join(pair_name(a, b) for a, b in loss_fn.pairs)]
    if "predict" in spec:
        weight = f" x {cfg.predict_weight:g}" if parts and cfg.predict_weight != 1 else ""
        parts.append(f"predict {', '.join(spec['predict']['properties'])}{weight}")
    return " + ".join(parts)


# -------------------------------------------------------------------------------------------- the log


class RunLog:
    """Rank 0's record of one run: opened when training starts, one :meth:`epoch` per epoch, :meth:`finish`.

    Opening it marks the run folder unfinished (no manifest), writes ``config.toml`` and keeps the
    ``metrics.csv`` rows of the epochs before ``start_epoch`` (a resumed run continues its table). Use it
    as a context manager around the epochs: the progress bar lives there.
    """

    def __init__(self, files: RunFiles, cfg: TrainConfig, start_epoch: int):
        from torch.utils.tensorboard import SummaryWriter

        self.files, self.cfg = files, cfg
        begin_stage(files.root, lock=False)  # the launching process holds the run's lock (run_train)
        files.checkpoints.mkdir(parents=True, exist_ok=True)
        write_config_toml(cfg, files.config)
        self.rows: list[dict[str, Any]] = read_metrics(files.metrics, start_epoch)
        self.writer = SummaryWriter(str(files.tensorboard))
        self.wandb = start_wandb(files, cfg) if cfg.wandb else None
        self.bar = _progress()
        self.task = None

    def __enter__(self) -> "RunLog":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)
        if exc[0] is not None:
            self._close_wandb(exit_code=1)

    def _close_wandb(self, exit_code: int = 0) -> None:
        if self.wandb is not None:
            run, self.wandb = self.wandb, None
            run.finish(exit_code=exit_code)

    def started(self, text: str) -> None:
        """The line that opens the run."""
        console.print(text, highlight=False)

    # per step

    def begin_epoch(self, epoch: int, steps: int, temperature: float) -> None:
        self.task = self.bar.add_task(f"epoch {epoch}/{self.cfg.epochs}", total=steps, loss=float("nan"),
                                      temp=temperature, rate=0.0)

    def step(self, step: int, completed: int, loss: float, lr: float, temperature: float, rate: float) -> None:
        """Progress bar and TensorBoard, every few steps."""
        self.bar.update(self.task, completed=completed, loss=loss, temp=temperature, rate=rate)
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)
        self.writer.add_scalar("train/temperature", temperature, step)

    # per epoch

    def epoch(self, row: dict[str, Any]) -> None:
        """One epoch's row: appended to ``metrics.csv`` and TensorBoard."""
        import math

        self.rows.append(row)
        write_metrics(self.rows, self.files.metrics)
        for key, v in row.items():
            if key.startswith("val_") and isinstance(v, float) and not math.isnan(v):
                self.writer.add_scalar(f"val/{key[4:]}", v, row["step"])
        self.writer.add_scalar("train/epoch_loss", row["train_loss"], row["step"])
        self.writer.flush()
        if self.wandb is not None:  # the metrics.csv row, as train/... and val/... (the per-step curve stays local)
            self.wandb.log({(f"val/{k[4:]}" if k.startswith("val_") else f"train/{k[6:]}" if k.startswith("train_")
                             else k): float(v) for k, v in row.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"},
                           step=int(row["step"]))

    def checkpoint(self, epoch: int, state: dict[str, Any], best: bool) -> Path:
        """``checkpoints/epoch-NNN.pt``, copied to ``last.pt`` (and ``best.pt`` when ``best``); then the epoch
        checkpoints older than the newest ``keep_checkpoints`` are deleted (0: all are kept)."""
        from cmma_cli.model import save_checkpoint

        path = save_checkpoint(self.files.epoch_checkpoint(epoch), state)
        for target in [self.files.last] + ([self.files.best] if best else []):
            with atomic(target) as tmp:
                shutil.copyfile(path, tmp)
        self.prune(epoch)
        return path

    def prune(self, epoch: int) -> list[Path]:
        """Delete ``checkpoints/epoch-NNN.pt`` of the epochs up to ``epoch - keep_checkpoints`` (``best.pt`` and
        ``last.pt`` are copies, so they stay); returns what was deleted. Later epochs (left by an earlier run of the
        folder that went further) are left alone."""
        keep = self.cfg.keep_checkpoints
        if keep <= 0:
            return []
        gone = []
        for path in self.files.epoch_checkpoints():
            try:
                number = int(path.stem.split("-", 1)[1])
            except (IndexError, ValueError):
                continue
            if number <= epoch - keep:
                path.unlink(missing_ok=True)
                gone.append(path)
        return gone

    def projector(self, tables: dict[str, tuple[Any, list[list[str]]]], header: list[str], step: int) -> None:
        """TensorBoard's embedding projector: one tensor per ``tables`` entry (``{tag: (vectors, metadata rows)}``)."""
        for tag, (vectors, rows) in tables.items():
            if len(rows):
                self.writer.add_embedding(vectors, metadata=rows, metadata_header=header, global_step=step, tag=tag)
        self.writer.flush()

    def validated(self, epoch: int, row: dict[str, Any]) -> None:
        """The epoch's printed line (when there were validation figures)."""
        console.print(f"  epoch {epoch}: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}, "
                      + (f"val property MSE {row['val_predict']:.4f}, " if "val_predict" in row else "")
                      + f"val R@1 {row['val_r1']:.3f} (chance {row['val_r1_chance']:.3f})", highlight=False)

    # the end

    def finish(self, config: dict[str, Any], inputs: list[Path], rows: dict[str, int],
               extra: dict[str, Any]) -> dict[str, Any]:
        """Close the events, write the manifest (last) and print the summary; returns the manifest."""
        self.writer.close()
        self._close_wandb()
        manifest = write_manifest(self.files.root, "train", config, inputs=inputs, rows=rows,
                                  extra={**extra, "first": self.rows[0] if self.rows else {},
                                         "last": self.rows[-1] if self.rows else {}})
        self.summary(extra["best"])
        return manifest

    def summary(self, best: dict[str, Any]) -> None:
        from rich.table import Table

        rows = self.rows
        if not rows:
            return
        table = Table(title=f"{self.files.name}: learning curve (first and last epoch)", title_justify="left")
        keys = [k for k in ("train_loss", "val_loss", "val_predict", "val_r1", "val_r1_chance", "temperature")
                if k in rows[-1]]
        table.add_column("epoch", justify="right")
        for k in keys:
            table.add_column(k, justify="right")
        for row in (rows[0], rows[-1]) if len(rows) > 1 else rows[:1]:
            table.add_row(str(row["epoch"]), *(f"{float(row[k]):.4f}" for k in keys))
        console.print(table)
        console.print(f"best.pt: epoch {best['epoch']} ({best['metric']} {best['value']}); checkpoints, metrics.csv and "
                      f"TensorBoard events in {self.files.root}.", highlight=False)
