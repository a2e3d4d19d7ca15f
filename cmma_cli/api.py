"""The stages as library calls: what the ``cmma`` commands run, and what one stage calls to run another.

Stages talk through the workspace; a stage that needs another stage to *run* (``cmma ablate`` trains and
embeds each variant) goes through these functions, never through the other stage's module, so each
stage's internals stay its own. Each function is exactly what its command does, with the same config
dataclass (:mod:`cmma_cli.config`) and the same ``force`` meaning, and returns the stage's manifest
(or its results). Heavy modules (torch, the stage itself) are imported when a function is called, so
importing this module is cheap::

    from cmma_cli import api
    from cmma_cli.config import EmbedConfig, TrainConfig
    from cmma_cli.workspace import Workspace

    ws = Workspace.resolve(None)
    api.train(ws, TrainConfig(epochs=5), run="small")        # cmma train --epochs 5 --run small
    api.embed(ws, EmbedConfig(run="small"))                  # cmma embed --run small
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from cmma_cli.config import EmbedConfig, EvaluateConfig, TrainConfig
    from cmma_cli.workspace import Workspace


def train(ws: "Workspace", cfg: "TrainConfig", run: str | None = None, resume: str | None = None,
          gpus: int | None = None, force: bool = False) -> dict[str, Any]:
    """``cmma train``: train a model on ``ws``'s processed data into ``runs/<run>/``; returns the run's manifest.

    ``run``: the run name (default: a timestamp; with ``resume="latest"``, the newest run). ``resume``:
    ``"latest"`` or a checkpoint path. ``gpus``: ranks on this machine (None: one GPU if there is one, else
    the CPU). ``force``: start ``run`` over, deleting its checkpoints and metrics.
    """
    from cmma_cli.train import run_train

    return run_train(ws, cfg, run=run, resume=resume, gpus=gpus, force=force)


def embed(ws: "Workspace", cfg: "EmbedConfig", force: bool = False) -> dict[str, Any]:
    """``cmma embed``: embed every processed material with run ``cfg.run`` (None: the newest finished run) into
    ``embeddings/<run>/``; skipped when up to date unless ``force``. Returns the embeddings' manifest."""
    from cmma_cli.embed import run_embed

    return run_embed(ws, cfg, force=force)


def evaluate(ws: "Workspace", cfg: "EvaluateConfig", force: bool = False) -> dict[str, Any]:
    """``cmma evaluate``: the report of run ``cfg.run``'s embeddings in ``reports/<run>/``; returns its metrics."""
    from cmma_cli.evaluate.data import resolve_run
    from cmma_cli.evaluate.pipeline import check_config, run_evaluate
    from cmma_cli.workspace import stage_lock

    check_config(cfg)  # its sentences first, as run_evaluate gives them
    run = resolve_run(ws, cfg.run)
    with stage_lock(ws.reports_dir(run), f"The report of run {run!r}"):  # one writer per report
        return run_evaluate(ws, cfg, force=force)


def explain(ws: "Workspace", cfg: "EvaluateConfig", material_id: str) -> dict[str, Any]:
    """``cmma evaluate --explain ID``: one material's attributions, in ``reports/<run>/explain/``."""
    from cmma_cli.evaluate.explain import run_explain

    return run_explain(ws, cfg, material_id)
