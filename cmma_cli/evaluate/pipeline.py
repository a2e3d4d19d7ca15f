"""``cmma evaluate``: a run's embeddings -> ``reports/<run>/`` (report.md, metrics.json, figures/).

Sections (``--sections``, all by default): ``probes`` (property regression and classification probes),
``retrieval`` (every ordered modality pair), ``synthesis`` (recipe-material match), ``latent`` (UMAP /
t-SNE maps, neighbourhood purity, interpolation), ``baselines`` (supervised single-modality and fusion
models on the same split) and ``explain`` (what drives the similarity of a few test materials). The
stage is skipped when the report exists for the same config, processed data and embeddings.
"""

from __future__ import annotations

import shlex
import time
from typing import Any, Callable

from cmma_cli.config import EvaluateConfig, as_dict, flat_dict, validate
from cmma_cli.console import console, esc, progress
from cmma_cli.errors import CMMAError
from cmma_cli.evaluate.data import EvalData, load_eval_data, resolve_run
from cmma_cli.evaluate.probes import CLASSIFICATION_TASKS
from cmma_cli.evaluate.report import print_summary, render_markdown
from cmma_cli.workspace import Workspace, begin_stage, is_up_to_date, write_json, write_manifest

STAGE = "evaluate"


def check_config(cfg: EvaluateConfig) -> None:
    """One sentence per bad option."""
    validate(cfg)  # the choices and checks of every setting (sections, maps), the modalities' sections included
    if not cfg.ks or any(k < 1 for k in cfg.ks):
        raise CMMAError(f"--ks must be positive numbers of results, e.g. 1,5,10, not {cfg.ks}.")
    for name in ("min_train", "min_test", "purity_k", "probe_hidden", "baseline_epochs", "baseline_batch_size"):
        if getattr(cfg, name) < 1:
            raise CMMAError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(cfg, name)}.")
    unknown_tasks = sorted(set(cfg.baseline_tasks) - set(CLASSIFICATION_TASKS) - {"none"})
    if unknown_tasks:
        raise CMMAError(f"--baseline-tasks names {', '.join(unknown_tasks)}: choose from {', '.join(CLASSIFICATION_TASKS)}, "
                        "or none.")
    if cfg.interpolation_steps < 2:
        raise CMMAError(f"--interpolation-steps must be at least 2, not {cfg.interpolation_steps}.")
    if cfg.explain_examples < 0:
        raise CMMAError(f"--explain-examples must be 0 or more, not {cfg.explain_examples}.")


def run_info(ws: Workspace, data: EvalData, cfg: EvaluateConfig) -> dict[str, Any]:
    """The header facts: run, checkpoint, modalities, split sizes, the command that reproduces the report."""
    ckpt = data.manifest.get("checkpoint", {})
    splits = {}
    for split in ("train", "val", "test"):
        ids = set(data.split_ids(split))
        splits[split] = {"materials": len(ids), **{m: int(sum(i in ids for i in data.tables[m].ids)) for m in data.modalities}}
    default = flat_dict(EvaluateConfig())
    command = ["cmma", "evaluate", "-w", str(ws.root), "--run", data.run]
    for key, value in flat_dict(cfg).items():  # every option that differs from its default
        if key != "run" and value != default[key] and value is not None:
            command += [f"--{key.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return {"run": data.run, "checkpoint": ckpt.get("path"), "epoch": ckpt.get("epoch"), "dim": data.manifest.get("dim"),
            "modalities": data.modalities, "splits": splits, "ks": list(cfg.ks), "seed": cfg.seed,
            "command": shlex.join(command), "properties": data.numeric_properties}


def _section(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    started = time.perf_counter()
    with console.status(f"Evaluating: {name}..."):
        result = fn()
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def run_evaluate(ws: Workspace, cfg: EvaluateConfig, force: bool = False) -> dict[str, Any]:
    """Evaluate one run's embeddings into ``reports/<run>/``; returns the metrics (what ``metrics.json`` holds)."""
    check_config(cfg)
    run = resolve_run(ws, cfg.run)
    out = ws.reports_dir(run)
    config = {**as_dict(cfg), "run": run}
    inputs = [ws.processed, ws.embeddings_dir(run)]
    if not force and is_up_to_date(out, config, inputs) and (out / "metrics.json").exists():
        import json

        console.print(f"reports/{esc(run)} is up to date with these embeddings and options: skipped (use --force to redo).",
                      highlight=False)
        metrics = json.loads((out / "metrics.json").read_text())
        print_summary(metrics, str(out / "report.md"))
        return metrics

    started = time.perf_counter()
    data = load_eval_data(ws, run)
    if len(data.split_ids("test")) == 0:
        raise CMMAError(f"The test split in {ws.processed} is empty (0 of {len(data.materials)} materials), so there is "
                        "nothing to evaluate on: rerun `cmma preprocess --force` with a --test-fraction above 0 (and "
                        "enough materials to fill it), then `cmma train` and `cmma embed` again.")
    unknown = sorted(set(cfg.baseline_properties) - set(data.numeric_properties) - {"none"})
    if unknown:
        raise CMMAError(f"--baseline-properties names {', '.join(unknown)}, which the processed data does not have as "
                        f"numbers: choose from {', '.join(data.numeric_properties)}.")
    begin_stage(out)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for old in figures.glob("*.png"):
        old.unlink()
    metrics: dict[str, Any] = {"run": run_info(ws, data, cfg)}
    console.print(f"Evaluating run {esc(run)} on {metrics['run']['splits']['test']['materials']} test materials "
                  f"(sections: {', '.join(cfg.sections)}).", highlight=False)

    if "probes" in cfg.sections:
        from cmma_cli.evaluate.probes import probe_count, run_probes

        t0 = time.perf_counter()
        with progress() as bar:
            task = bar.add_task("Probes (ridge, MLP, logistic)", total=probe_count(data))
            probes, _ = run_probes(data, cfg.hull_threshold, cfg.gap_threshold, cfg.seed, cfg.probe_hidden,
                                   cfg.min_train, cfg.min_test, tick=lambda: bar.advance(task))
        probes["seconds"] = round(time.perf_counter() - t0, 2)
        metrics["probes"] = probes
    if "retrieval" in cfg.sections:
        from cmma_cli.evaluate.retrieval import run_retrieval

        metrics["retrieval"] = _section("retrieval", lambda: run_retrieval(data, tuple(cfg.ks)))
    if "synthesis" in cfg.sections:
        from cmma_cli.evaluate.synthesis import run_synthesis

        metrics["synthesis"] = _section("synthesis match", lambda: run_synthesis(data))
    if "baselines" in cfg.sections:
        from cmma_cli.evaluate.baselines import run_baselines

        t0 = time.perf_counter()
        metrics["baselines"] = run_baselines(ws, data, cfg, metrics.get("probes"))
        metrics["baselines"]["seconds"] = round(time.perf_counter() - t0, 2)
    if "latent" in cfg.sections:
        from cmma_cli.evaluate.latent import run_latent

        metrics["latent"] = _section("latent space maps", lambda: run_latent(data, cfg, figures))
    if "explain" in cfg.sections:
        from cmma_cli.evaluate.explain import run_explain_examples

        metrics["explain"] = _section("attributions", lambda: run_explain_examples(ws, data, cfg, figures))

    metrics["seconds"] = round(time.perf_counter() - started, 2)
    write_json(metrics, out / "metrics.json")
    (out / "report.md").write_text(render_markdown(metrics))
    write_manifest(out, STAGE, config, inputs=inputs,
                   rows={"test": metrics["run"]["splits"]["test"]["materials"],
                         "figures": len(list(figures.glob("*.png")))},
                   extra={"run": run, "sections": list(cfg.sections), "seconds": metrics["seconds"]})
    print_summary(metrics, str(out / "report.md"))
    return metrics
