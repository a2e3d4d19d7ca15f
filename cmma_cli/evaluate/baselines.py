"""Supervised baselines on the same split: what the encoders reach when trained directly on a property.

For every numeric property the probes scored, with the run's own encoder settings (the same GNN, the
same XRD CNN, the same text model and tuning), each trained from scratch on the train split with an
MLP head and a mean-squared loss on the standardised property, the epoch chosen by val MAE:

- ``<modality>``: one encoder alone (single-modality supervised model);
- ``intermediate fusion``: every encoder, their outputs concatenated (zeros and a flag where a material
  lacks a modality) into one MLP head, trained end to end;
- ``late fusion``: the mean of the single-modality models' predictions for each material.

All are scored on the test materials that have the property (and the model's inputs), like the probes.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn

from cmma_cli.console import progress
from cmma_cli.evaluate import metrics as M
from cmma_cli.evaluate.data import EvalData
from cmma_cli.modalities import get_modality
from cmma_cli.modalities.base import Context
from cmma_cli.modalities.batches import MaterialSet, to_device
from cmma_cli.model import read_checkpoint
from cmma_cli.workspace import Workspace

DESCRIPTION = (
    "Supervised models trained directly on each property, on the same train split, with the run's own encoder "
    "settings and an MLP head (epoch chosen by val MAE): one per modality, intermediate fusion (all encoders' "
    "outputs concatenated into one head, trained end to end) and late fusion (the mean of the single-modality "
    "predictions). They appear in the property tables above, below the CMMA probes."
)


class Regressor(nn.Module):
    """Encoders of ``modalities`` -> [outputs, presence flags] concatenated -> MLP -> one number per material."""

    def __init__(self, specs: dict[str, dict[str, Any]], modalities: list[str], hidden: int = 128):
        super().__init__()
        self.modalities = list(modalities)
        self.encoders = nn.ModuleDict({m: get_modality(m).encoder(specs[m]) for m in self.modalities})
        width = sum(self.encoders[m].out_dim + 1 for m in self.modalities)
        self.head = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        parts = []
        n = batch["rows"].shape[0]
        for m in self.modalities:
            mask = batch["masks"][m]
            feat = torch.zeros(n, self.encoders[m].out_dim, device=mask.device)
            if m in batch["inputs"]:
                feat = feat.index_put((mask,), self.encoders[m](batch["inputs"][m]).float())
            parts += [feat, mask.float()[:, None]]
        return self.head(torch.cat(parts, dim=1)).squeeze(1)


def _predict(model: Regressor, materials: MaterialSet, rows: np.ndarray, batch_size: int, device) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = to_device(materials.collate(rows[start : start + batch_size]), device)
            out.append(model(batch).float().cpu().numpy())
    model.train()
    return np.concatenate(out) if out else np.zeros(0)


def train_regressor(specs, modalities, sets: dict[str, MaterialSet], rows: dict[str, np.ndarray],
                    y: dict[str, np.ndarray], cfg: Any, device: torch.device) -> np.ndarray:
    """Train one baseline; returns its predictions for ``rows["test"]`` (in property units)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    mu, sd = float(y["train"].mean()), float(y["train"].std()) or 1.0
    model = Regressor(specs, modalities).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.baseline_lr, weight_decay=0.01)
    target = torch.from_numpy(((y["train"] - mu) / sd).astype(np.float32))
    best, best_mae = None, math.inf
    order = np.arange(len(rows["train"]))
    for _ in range(cfg.baseline_epochs):
        rng.shuffle(order)
        for start in range(0, len(order), cfg.baseline_batch_size):
            pick = order[start : start + cfg.baseline_batch_size]
            if len(pick) < 2:
                continue
            batch = to_device(sets["train"].collate(rows["train"][pick]), device)
            loss = nn.functional.mse_loss(model(batch), target[pick].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        if len(rows["val"]) >= 3:
            val_mae = M.mae(y["val"], _predict(model, sets["val"], rows["val"], 256, device) * sd + mu)
            if val_mae < best_mae:
                best_mae, best = val_mae, copy.deepcopy(model.state_dict())
    if best is not None:
        model.load_state_dict(best)
    return _predict(model, sets["test"], rows["test"], 256, device) * sd + mu


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


def run_baselines(ws: Workspace, data: EvalData, cfg: Any, probes: dict[str, Any] | None) -> dict[str, Any]:
    """``{"regression": {property: {baseline: scores}}, ...}`` for the properties the probes scored."""
    from cmma_cli.encode import pick_device

    out: dict[str, Any] = {"regression": {}, "description": DESCRIPTION, "skipped": []}
    props = list((probes or {}).get("regression", {})) or data.numeric_properties
    if cfg.baseline_properties:  # checked against the data by the pipeline, before anything is written
        props = [p for p in props if p in cfg.baseline_properties]
    checkpoint = data.manifest.get("checkpoint", {}).get("path")
    if not checkpoint:
        out["note"] = "The embeddings manifest names no checkpoint, so the run's encoder settings are unknown: no baselines."
        return out
    spec = read_checkpoint(checkpoint)["spec"]
    modalities = [m for m in spec["modalities"] if m in data.tables]
    specs = {m: spec["encoders"][m] for m in modalities}
    device = pick_device(cfg.device)
    ctx = Context(data.processed_manifest, cache_dir=ws.root / "cache", show_progress=False)
    tables = _split_tables(ws, data, modalities)
    sets = {s: MaterialSet(t, specs, ctx) for s, t in tables.items()}
    values = data.materials.set_index("material_id")
    plan = [(p, m) for p in props for m in [*modalities, "intermediate fusion"]]
    with progress() as bar:
        task = bar.add_task(f"Supervised baselines ({cfg.baseline_epochs} epochs each)", total=len(plan))
        for prop in props:
            y_all = {s: values.loc[sets[s].material_ids, prop].astype(float).to_numpy() for s in sets}
            preds: dict[str, dict[str, float]] = {}
            for name in [*modalities, "intermediate fusion"]:
                used = modalities if name == "intermediate fusion" else [name]
                rows, y = {}, {}
                for s in sets:
                    has_input = np.any([sets[s].present(m) for m in used], axis=0)
                    rows[s] = np.flatnonzero(has_input & ~np.isnan(y_all[s]))
                    y[s] = y_all[s][rows[s]]
                if len(rows["train"]) < cfg.min_train or len(rows["test"]) < cfg.min_test:
                    out["skipped"].append({"target": prop, "baseline": name,
                                           "reason": f"{len(rows['train'])} train / {len(rows['test'])} test rows"})
                    bar.advance(task)
                    continue
                pred = train_regressor(specs, used, sets, rows, y, cfg, device)
                scores = M.regression_scores(y["test"], pred)
                scores["inputs"] = "+".join(used)
                out["regression"].setdefault(prop, {})[name] = scores
                if name != "intermediate fusion":
                    ids = [sets["test"].material_ids[r] for r in rows["test"]]
                    for mid, v in zip(ids, pred):
                        preds.setdefault(mid, {})[name] = float(v)
                bar.advance(task)
            if preds:
                ids = [mid for mid in sets["test"].material_ids if mid in preds]
                late = np.array([np.mean(list(preds[mid].values())) for mid in ids])
                truth = values.loc[ids, prop].astype(float).to_numpy()
                scores = M.regression_scores(truth, late)
                scores["inputs"] = "mean of " + "+".join(m for m in modalities if m in out["regression"].get(prop, {}))
                out["regression"].setdefault(prop, {})["late fusion"] = scores
    return out
