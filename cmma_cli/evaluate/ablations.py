"""``cmma ablate KIND`` (alias ``cmma evaluate --ablation KIND``): what each design choice of the evaluated run is worth.

Every variant changes one setting of the evaluated run's training config, is trained through
:func:`cmma_cli.api.train` (run ``<run>-ablate-<kind>-<variant>``; reused when it already finished with the
same config) and embedded through :func:`cmma_cli.api.embed` -- what ``cmma train`` and ``cmma embed`` run --
then scored exactly like the report does: ridge probes on the unified embeddings and retrieval on the test
split. Kinds:

- ``temperature``: learnable vs fixed softmax temperature;
- ``dim``: latent dimension (``ablation_dims``);
- ``modalities``: which modalities are trained together (every pair, and all of them);
- ``encoder``: each of the run's modalities' own variants
  (:meth:`~cmma_cli.modalities.base.Modality.ablation_variants`: the structure GNN architecture -- schnet,
  cgcnn, painn --, frozen vs fine-tuned text (top 2 layers), ...), one change to its section each;
- ``missing``: no training: the evaluated run's unified embedding rebuilt without one modality at
  inference, probes refitted on it;
- ``loss``: the training objective: the contrastive loss, prediction only (a property head regresses the
  numeric properties from each modality's embedding, no alignment) and the two summed (``cmma train
  --objective``).

Results: ``reports/<run>/ablation-<kind>.md`` and ``.json``, and a table on the terminal.
"""

from __future__ import annotations

from dataclasses import replace
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd

from cmma_cli.config import EmbedConfig, EvaluateConfig, TrainConfig, as_dict, from_dict
from cmma_cli.console import console, esc
from cmma_cli.errors import CMMAError
from cmma_cli.evaluate.data import UNIFIED, EvalData, Embeddings, load_eval_data, resolve_run
from cmma_cli.evaluate.probes import fit_regression, split_parts
from cmma_cli.evaluate.report import fmt, md_table
from cmma_cli.evaluate.retrieval import run_retrieval
from cmma_cli.modalities import get_modality
from cmma_cli.workspace import Workspace, read_manifest, write_json

KINDS = ("temperature", "dim", "modalities", "missing", "encoder", "loss")


def base_config(data: EvalData) -> TrainConfig:
    """The training config of the run that made the evaluated embeddings (as its checkpoint recorded it: nested
    modality sections, or the flat keys of checkpoints written before them)."""
    from cmma_cli.model import read_checkpoint

    if data.checkpoint is None:
        raise CMMAError(f"The embeddings of run {data.run} name no checkpoint: run `cmma embed --run {data.run} --force`.")
    return from_dict(TrainConfig, read_checkpoint(data.checkpoint)["config"])


def encoder_variants(base: TrainConfig) -> list[tuple[str, TrainConfig]]:
    """``--ablation encoder``: each of the run's modalities' own variants, applied to its section of ``base``."""
    out = []
    for m in base.modalities:
        section = base.settings.get(m)
        for label, changes in get_modality(m).ablation_variants(section):
            out.append((label, replace(base, **{m: replace(section, **changes)})))
    return out


def variants(kind: str, base: TrainConfig, cfg: EvaluateConfig) -> list[tuple[str, TrainConfig]]:
    """(label, training config) of every variant of ``kind`` (the base setting included, for reference)."""
    if cfg.ablation_epochs is not None:
        base = replace(base, epochs=cfg.ablation_epochs)
    if kind == "temperature":
        return [("learnable", replace(base, learn_temperature=True)), ("fixed", replace(base, learn_temperature=False))]
    if kind == "dim":
        return [(f"d={d}", replace(base, embed_dim=d)) for d in cfg.ablation_dims]
    if kind == "modalities":
        mods = list(base.modalities)
        sets = [list(p) for p in combinations(mods, 2)] + ([mods] if len(mods) > 2 else [])
        return [("+".join(s), replace(base, modalities=s, pairs="all")) for s in sets]
    if kind == "encoder":
        return encoder_variants(base)
    if kind == "loss":
        return [("contrastive", replace(base, objective="contrastive", predict_properties=[])),
                ("predict", replace(base, objective="predict")),
                ("contrastive+predict", replace(base, objective="contrastive+predict"))]
    raise CMMAError(f"--ablation must be one of {', '.join(KINDS)}, not {kind!r}.")


def _score(data: EvalData, cfg: EvaluateConfig, props: list[str], retrieval: bool = True) -> dict[str, Any]:
    """Ridge probe MAE / R² on the unified embeddings per property, and mean retrieval figures."""
    row: dict[str, Any] = {}
    for prop in props:
        target = pd.to_numeric(data.materials[prop], errors="coerce").astype(float)
        parts = split_parts(data, UNIFIED, target)
        if len(parts["train"]) >= cfg.min_train and len(parts["test"]) >= cfg.min_test:
            scores, _ = fit_regression(parts, cfg.seed, cfg.probe_hidden)
            row[f"{prop} MAE"] = scores["ridge"]["mae"]
            row[f"{prop} R²"] = scores["ridge"]["r2"]
    pairs = run_retrieval(data, tuple(cfg.ks))["pairs"] if retrieval else {}
    pairs = {k: v for k, v in pairs.items() if v["queries"] >= cfg.min_test}
    if pairs:
        row["mean R@1"] = float(np.mean([s["recall@1"] for s in pairs.values()]))
        row["mean MRR"] = float(np.mean([s["mrr"] for s in pairs.values()]))
        row["pairs"] = len(pairs)
    return row


def _trained(ws: Workspace, name: str, train_cfg: TrainConfig) -> bool:
    manifest = read_manifest(ws.run_dir(name))
    return manifest is not None and manifest.get("config") == as_dict(train_cfg)


def _without(data: EvalData, dropped: str) -> EvalData:
    """``data`` with ``unified`` rebuilt as the normalised mean of every modality but ``dropped``."""
    kept = [m for m in data.modalities if m != dropped]
    sums: dict[str, np.ndarray] = {}
    for m in kept:
        for mid, v in zip(data.tables[m].ids, data.tables[m].vectors):
            sums[mid] = sums.get(mid, 0) + v
    ids = np.array(list(sums), dtype=object)
    vecs = np.stack([sums[m] for m in ids]) if len(ids) else np.zeros((0, 1), np.float32)
    vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    tables = {UNIFIED: Embeddings(ids, vecs.astype(np.float32)), **{m: data.tables[m] for m in kept}}
    return replace(data, tables=tables)


def run_ablation(ws: Workspace, cfg: EvaluateConfig, kind: str, force: bool = False) -> dict[str, Any]:
    """Train, embed and score every variant of ``kind``; write ``reports/<run>/ablation-<kind>.md/.json``."""
    from cmma_cli import api
    from cmma_cli.evaluate.pipeline import check_config

    if kind not in KINDS:
        raise CMMAError(f"--ablation must be one of {', '.join(KINDS)}, not {kind!r}.")
    check_config(cfg)
    run = resolve_run(ws, cfg.run)
    data = load_eval_data(ws, run)
    props = list(data.numeric_properties)
    rows: list[dict[str, Any]] = []
    if kind == "missing":
        rows.append({"variant": "all modalities", "run": run, **_score(data, cfg, props, retrieval=False)})
        for m in data.modalities:
            rows.append({"variant": f"without {m}", "run": run, **_score(_without(data, m), cfg, props, retrieval=False)})
    else:
        base = base_config(data)
        for label, train_cfg in variants(kind, base, cfg):
            name = f"{run}-ablate-{kind}-{label.replace(' ', '-').replace(':', '').replace('=', '').replace('+', '-')}"
            console.print(f"[bold]Ablation {kind}: {esc(label)}[/] (run {esc(name)})", highlight=False)
            if force or not _trained(ws, name, train_cfg):
                api.train(ws, train_cfg, run=name, force=True)
            api.embed(ws, EmbedConfig(run=name, device=cfg.device), force=force)
            rows.append({"variant": label, "run": name, **_score(load_eval_data(ws, name), cfg, props)})
    note = ("Ridge probes on the unified embeddings (rebuilt without the dropped modality), on the test split."
            if kind == "missing" else
            "Ridge probes on the unified embeddings, and retrieval averaged over the ordered modality pairs with at "
            f"least {cfg.min_test} test queries, all on the test split.")
    result = {"kind": kind, "run": run, "rows": rows, "note": note}
    out = ws.reports_dir(run)
    write_json(result, out / f"ablation-{kind}.json")
    columns = list(dict.fromkeys(k for r in rows for k in r if k not in ("variant", "run")))
    table_rows = [[r["variant"], *(r.get(c) for c in columns)] for r in rows]
    (out / f"ablation-{kind}.md").write_text(
        f"# Ablation: {kind} (run `{run}`)\n\n{result['note']}\n\n" + md_table(["variant", *columns], table_rows) + "\n")
    from rich.table import Table

    table = Table(title=f"Ablation {kind} (test split)", title_justify="left")
    table.add_column("metric")
    for r in rows:
        table.add_column(esc(r["variant"]), justify="right")
    for c in columns:
        table.add_row(c, *(fmt(r.get(c)) for r in rows))
    console.print(table)
    console.print(esc(f"Written: {out / f'ablation-{kind}.md'}"), highlight=False)
    return result
