"""Supervised baselines on the same split: what the encoders reach when trained directly on a target.

For every numeric property and every classification task the probes scored (stable, metal, crystal
system), with the run's own encoder settings (the same GNN, the same XRD CNN, the same text model and
tuning), each trained from scratch on the train split with an MLP head (mean-squared loss on the
standardised property, or cross-entropy over the task's classes), the epoch chosen on val (lowest MAE,
highest macro F1):

- ``<modality>``: one encoder alone (single-modality supervised model);
- ``intermediate fusion``: every encoder, their outputs concatenated (zeros and a flag where a material
  lacks a modality) into one MLP head, trained end to end;
- ``late fusion``: the mean of the single-modality models' predictions (class probabilities) per material.

All are scored on the test materials that have the target (and the model's inputs), like the probes.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn

from cmma_cli.console import progress
from cmma_cli.evaluate import metrics as M
from cmma_cli.evaluate.data import EvalData
from cmma_cli.evaluate.probes import CLASSIFICATION_TASKS, classification_labels, classification_scores, missing
from cmma_cli.modalities import get_modality
from cmma_cli.modalities.base import Context
from cmma_cli.modalities.batches import MaterialSet, encoder_inputs, pool_items, to_device
from cmma_cli.model import read_checkpoint
from cmma_cli.workspace import Workspace

DESCRIPTION = (
    "Supervised models trained directly on each property or class label, on the same train split, with the run's "
    "own encoder settings and an MLP head (epoch chosen on val: lowest MAE, highest macro F1): one per modality, "
    "intermediate fusion (all encoders' outputs concatenated into one head, trained end to end) and late fusion "
    "(the mean of the single-modality predictions or class probabilities)."
)


@dataclass
class Target:
    """One thing to predict: a property (``classes`` None) or a classification task over ``classes``."""

    name: str
    values: pd.Series  # indexed by material id: floats (NaN unknown) or class names (None unknown)
    classes: list[str] | None = None

    @property
    def kind(self) -> str:
        return "regression" if self.classes is None else "classification"

    def known(self, y: np.ndarray) -> np.ndarray:
        if self.classes is None:
            return ~np.isnan(y.astype(float))
        return np.array([not missing(v) for v in y], dtype=bool)


class Predictor(nn.Module):
    """Encoders of ``modalities`` -> [outputs, presence flags] concatenated -> MLP -> ``outputs`` numbers per material."""

    def __init__(self, specs: dict[str, dict[str, Any]], modalities: list[str], outputs: int = 1, hidden: int = 128):
        super().__init__()
        self.modalities = list(modalities)
        self.encoders = nn.ModuleDict({m: get_modality(m).encoder(specs[m]) for m in self.modalities})
        width = sum(self.encoders[m].out_dim + 1 for m in self.modalities)
        self.head = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, outputs))

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        parts = []
        n = batch["rows"].shape[0]
        for m in self.modalities:
            mask = batch["masks"][m]
            feat = torch.zeros(n, self.encoders[m].out_dim, device=mask.device)
            if m in batch["inputs"]:
                x = batch["inputs"][m]
                feat = feat.index_put((mask,), pool_items(self.encoders[m](encoder_inputs(x)).float(), x))
            parts += [feat, mask.float()[:, None]]
        return self.head(torch.cat(parts, dim=1))


def _predict(model: Predictor, materials: MaterialSet, rows: np.ndarray, batch_size: int, device) -> np.ndarray:
    """(rows, outputs) raw model outputs."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = to_device(materials.collate(rows[start : start + batch_size]), device)
            out.append(model(batch).float().cpu().numpy())
    model.train()
    return np.concatenate(out) if out else np.zeros((0, 1))


def train_baseline(specs, modalities, sets: dict[str, MaterialSet], rows: dict[str, np.ndarray],
                   y: dict[str, np.ndarray], cfg: Any, device: torch.device, classes: list[str] | None = None
                   ) -> np.ndarray:
    """Train one baseline; returns its test predictions: ``(n,)`` in property units, or ``(n, classes)`` probabilities."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if classes is None:
        mu, sd = float(y["train"].mean()), float(y["train"].std()) or 1.0
        target = torch.from_numpy(((y["train"].astype(float) - mu) / sd).astype(np.float32))
        loss_fn = lambda out, t: nn.functional.mse_loss(out.squeeze(1), t)  # noqa: E731
        decode = lambda out: out[:, 0] * sd + mu  # noqa: E731
        score = lambda s, pred: -M.mae(y[s].astype(float), pred)  # noqa: E731
    else:
        index = {c: i for i, c in enumerate(classes)}
        target = torch.tensor([index[v] for v in y["train"]], dtype=torch.long)
        loss_fn = nn.functional.cross_entropy
        decode = lambda out: torch.softmax(torch.from_numpy(out), dim=1).numpy()  # noqa: E731
        score = lambda s, proba: M.macro_f1(y[s], np.asarray(classes, dtype=object)[proba.argmax(1)], classes)  # noqa: E731
    model = Predictor(specs, modalities, outputs=1 if classes is None else len(classes)).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.baseline_lr, weight_decay=0.01)
    best, best_score = None, -math.inf
    order = np.arange(len(rows["train"]))
    for _ in range(cfg.baseline_epochs):
        rng.shuffle(order)
        for start in range(0, len(order), cfg.baseline_batch_size):
            pick = order[start : start + cfg.baseline_batch_size]
            if len(pick) < 2:
                continue
            batch = to_device(sets["train"].collate(rows["train"][pick]), device)
            loss = loss_fn(model(batch), target[pick].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        if len(rows["val"]) >= 3:
            val_score = score("val", decode(_predict(model, sets["val"], rows["val"], 256, device)))
            if val_score > best_score:
                best_score, best = val_score, copy.deepcopy(model.state_dict())
    if best is not None:
        model.load_state_dict(best)
    return decode(_predict(model, sets["test"], rows["test"], 256, device))


def _scores(target: Target, truth: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    if target.classes is None:
        return M.regression_scores(truth.astype(float), pred)
    labels = np.asarray(target.classes, dtype=object)[pred.argmax(1)]
    return classification_scores(truth, labels, pred, target.classes)


def _split_tables(ws: Workspace, data: EvalData, modalities: list[str]) -> dict[str, pa.Table]:
    path = ws.processed / "materials.parquet"
    columns = ["material_id"]
    for m in modalities:
        columns += [c for c in get_modality(m).columns if c not in columns]
    available = pq.ParquetFile(path).schema_arrow.names
    table = pq.read_table(path, columns=[c for c in columns if c in available])
    out = {}
    for split in ("train", "val", "test"):
        ids = pa.array([str(m) for m in data.split_ids(split)], pa.string())
        out[split] = table.filter(pc.is_in(table["material_id"].cast(pa.string()), value_set=ids))
    return out


def _targets(data: EvalData, cfg: Any, probes: dict[str, Any] | None) -> list[Target]:
    """The properties and classification tasks to train baselines on (those the probes scored, when they ran)."""
    values = data.materials.set_index("material_id")
    scored = probes or {}
    props = list(scored.get("regression", {})) if probes else list(data.numeric_properties)
    if cfg.baseline_properties:  # checked by the pipeline before anything is written; "none" matches nothing
        props = [p for p in props if p in cfg.baseline_properties]
    tasks = list(scored.get("classification", {})) if probes else list(CLASSIFICATION_TASKS)
    if cfg.baseline_tasks:
        tasks = [t for t in tasks if t in cfg.baseline_tasks]
    out = [Target(p, pd.to_numeric(values[p], errors="coerce").astype(float)) for p in props]
    train = values["split"] == "train"
    for task in tasks:
        labels, _ = classification_labels(data.materials, task, cfg.hull_threshold, cfg.gap_threshold)
        if labels is None:
            continue
        labels = pd.Series([None if missing(v) else str(v) for v in labels.tolist()], index=values.index, dtype=object)
        classes = sorted({v for v in labels[train] if not missing(v)})
        out.append(Target(task, labels, classes))
    return out


def run_baselines(ws: Workspace, data: EvalData, cfg: Any, probes: dict[str, Any] | None) -> dict[str, Any]:
    """``{"regression": {property: {baseline: scores}}, "classification": {task: {baseline: scores}}, ...}``."""
    from cmma_cli.encode import pick_device

    out: dict[str, Any] = {"regression": {}, "classification": {}, "description": DESCRIPTION, "skipped": []}
    targets = _targets(data, cfg, probes)
    if data.checkpoint is None:
        out["note"] = "The embeddings manifest names no checkpoint, so the run's encoder settings are unknown: no baselines."
        return out
    spec = read_checkpoint(data.checkpoint)["spec"]
    modalities = [m for m in spec["modalities"] if m in data.tables]
    specs = {m: spec["encoders"][m] for m in modalities}
    device = pick_device(cfg.device)
    ctx = Context(data.processed_manifest, cache_dir=ws.cache, show_progress=False)
    tables = _split_tables(ws, data, modalities)
    sets = {s: MaterialSet(t, specs, ctx) for s, t in tables.items()}
    names = [*modalities, "intermediate fusion"]
    with progress() as bar:
        task = bar.add_task(f"Supervised baselines ({cfg.baseline_epochs} epochs each)", total=len(targets) * len(names))
        for target in targets:
            y_all = {s: target.values.loc[sets[s].material_ids].to_numpy() for s in sets}
            results = out[target.kind]
            preds: dict[str, dict[str, np.ndarray]] = {}
            for name in names:
                used = modalities if name == "intermediate fusion" else [name]
                rows, y = {}, {}
                for s in sets:
                    has_input = np.any([sets[s].present(m) for m in used], axis=0)
                    rows[s] = np.flatnonzero(has_input & target.known(y_all[s]))
                    y[s] = y_all[s][rows[s]]
                reason = None
                if len(rows["train"]) < cfg.min_train or len(rows["test"]) < cfg.min_test:
                    reason = f"{len(rows['train'])} train / {len(rows['test'])} test rows"
                elif target.classes is not None and len(set(y["train"].tolist())) < 2:
                    reason = "one class only in the train split"
                if reason:
                    out["skipped"].append({"target": target.name, "baseline": name, "reason": reason})
                    bar.advance(task)
                    continue
                pred = train_baseline(specs, used, sets, rows, y, cfg, device, target.classes)
                scores = _scores(target, y["test"], pred)
                scores["inputs"] = "+".join(used)
                results.setdefault(target.name, {})[name] = scores
                if name != "intermediate fusion":
                    for mid, v in zip((sets["test"].material_ids[r] for r in rows["test"]), pred):
                        preds.setdefault(mid, {})[name] = v
                bar.advance(task)
            if preds:
                ids = [mid for mid in sets["test"].material_ids if mid in preds]
                late = np.stack([np.mean(list(preds[mid].values()), axis=0) for mid in ids])
                scores = _scores(target, target.values.loc[ids].to_numpy(), late)
                scores["inputs"] = "mean of " + "+".join(m for m in modalities if m in results.get(target.name, {}))
                results.setdefault(target.name, {})["late fusion"] = scores
    return out
