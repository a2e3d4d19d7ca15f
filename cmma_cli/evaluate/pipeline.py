"""``cmma evaluate``: a run's embeddings -> ``reports/<run>/`` (report.md, metrics.json, figures/).

Sections (``--sections``, all by default): ``probes`` (property regression and classification probes),
``retrieval`` (every ordered modality pair), ``synthesis`` (recipe-material match), ``latent`` (UMAP /
t-SNE maps, neighbourhood purity, interpolation), ``baselines`` (supervised single-modality and fusion
models on the same split) and ``explain`` (what drives the similarity of a few test materials). The
stage is skipped when the report exists for the same config, processed data and embeddings.
"""

from __future__ import annotations

import os
import shlex
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from cmma_cli.config import SECTIONS, EvaluateConfig, as_dict, flat_dict, validate
from cmma_cli.console import console, esc, progress
from cmma_cli.errors import CMMAError
from cmma_cli.evaluate.data import EvalData, load_eval_data, resolve_run
from cmma_cli.evaluate.probes import CLASSIFICATION_TASKS
from cmma_cli.evaluate.report import print_summary, render_markdown
from cmma_cli.workspace import (Workspace, begin_stage, is_up_to_date, manifest_hash, read_manifest, write_json,
                                write_manifest, write_text)

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
    command = ["cmma", "evaluate", "-w", portable_workspace(ws), "--run", data.run]
    for key, value in flat_dict(cfg).items():  # every option that differs from its default
        if key != "run" and value != default[key] and value is not None:
            command += [f"--{key.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    trained = read_manifest(ws.run_dir(data.run)) or {}
    train_config = trained.get("config") or {}
    return {"run": data.run, "checkpoint": ckpt.get("path"), "epoch": ckpt.get("epoch"), "dim": data.manifest.get("dim"),
            "modalities": data.modalities, "splits": splits, "ks": list(cfg.ks), "seed": cfg.seed,
            "train_seed": train_config.get("seed"), "train_config": train_config,
            "command": shlex.join(command).replace(shlex.quote(WORKSPACE_PLACEHOLDER), WORKSPACE_PLACEHOLDER),
            "properties": data.numeric_properties}


#: What the reproduce line says for a workspace outside the current folder (no absolute path in a shared report).
WORKSPACE_PLACEHOLDER = "<workspace>"


def portable_workspace(ws: Workspace) -> str:
    """The workspace as the reproduce line writes it: relative to the current folder when inside it, else
    ``<workspace>`` (a report is shared; an absolute path names someone's machine and breaks when it moves)."""
    try:
        relative = ws.root.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return WORKSPACE_PLACEHOLDER
    return relative.as_posix() or "."


def input_hashes(ws: Workspace, inputs: list[Path]) -> dict[str, str | None]:
    """``{folder: manifest hash}`` of the stage inputs a section was computed from (None: unfinished)."""
    return {ws.portable(p): (manifest_hash(p) if read_manifest(p) is not None else None) for p in inputs}


def carried_sections(old: dict[str, Any] | None, ran: list[str], hashes: dict[str, Any]) -> dict[str, Any]:
    """The sections of the previous ``metrics.json`` that this run does not recompute, kept as they were and marked:
    ``carried`` (always) and ``stale`` (the processed data or the embeddings changed since they were computed)."""
    if not old:
        return {}
    out = {}
    for name in SECTIONS:
        section = old.get(name)
        if name in ran or not isinstance(section, dict):
            continue
        section = dict(section)
        section["carried"] = True
        section["stale"] = section.get("inputs") != hashes
        out[name] = section
    return out


def section_figures(metrics: dict[str, Any]) -> set[str]:
    """The figure file names (under ``figures/``) that a report of ``metrics`` links."""
    names = set(metrics.get("latent", {}).get("figures", []) or [])
    for ex in metrics.get("explain", {}).get("examples", []) or []:
        names |= {p["figure"] for p in ex.get("pairs", []) if p.get("figure")}
    return names


def publish_figures(staging: Path, figures: Path) -> None:
    """Move the new figures from ``staging`` into ``figures/``, each by an atomic rename (never a half-written PNG)."""
    figures.mkdir(parents=True, exist_ok=True)
    for path in sorted(staging.glob("*")):
        if path.is_file():
            os.replace(path, figures / path.name)


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
    previous = _previous_metrics(out)
    begin_stage(out)
    figures = out / "figures"
    staging = out / f".figures-{os.getpid()}"  # new figures land here, then move in one by one: never half-written
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    hashes = input_hashes(ws, inputs)
    metrics: dict[str, Any] = {"run": run_info(ws, data, cfg)}
    console.print(f"Evaluating run {esc(run)} on {metrics['run']['splits']['test']['materials']} test materials "
                  f"(sections: {', '.join(cfg.sections)}).", highlight=False)
    try:
        _run_sections(ws, data, cfg, metrics, staging)
        for name in cfg.sections:
            if isinstance(metrics.get(name), dict):
                metrics[name]["inputs"] = hashes
        carried = carried_sections(previous, list(cfg.sections), hashes)
        metrics.update({k: v for k, v in carried.items()})
        metrics["carried"] = sorted(carried)
        metrics["seconds"] = round(time.perf_counter() - started, 2)
        # figures first (each an atomic rename), then metrics.json and report.md (atomic): a kill at any point leaves
        # a report whose every linked figure is whole; old figures are removed only once no report links them
        publish_figures(staging, figures)
        write_json(metrics, out / "metrics.json")
        write_text(render_markdown(metrics), out / "report.md")
        linked = section_figures(metrics)
        for old in figures.glob("*.png"):
            if old.name not in linked:
                old.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_manifest(out, STAGE, config, inputs=inputs,
                   rows={"test": metrics["run"]["splits"]["test"]["materials"],
                         "figures": len(list(figures.glob("*.png")))},
                   extra={"run": run, "sections": list(cfg.sections), "carried": metrics["carried"],
                          "seconds": metrics["seconds"]})
    print_summary(metrics, str(out / "report.md"))
    return metrics


def _previous_metrics(out: Path) -> dict[str, Any] | None:
    """The ``metrics.json`` a previous evaluate wrote (None: none, or unreadable)."""
    import json

    try:
        old = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return old if isinstance(old, dict) else None


def _run_sections(ws: Workspace, data: EvalData, cfg: EvaluateConfig, metrics: dict[str, Any], figures: Path) -> None:
    """Compute the sections ``cfg`` names into ``metrics`` (figures written under ``figures``)."""
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

        metrics["retrieval"] = _section("retrieval", lambda: run_retrieval(data, tuple(cfg.ks), seed=cfg.seed))
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
