"""Validation after each epoch: the objective's loss per pair on the val split, and cross-modal R@1.

R@1 is scored by :mod:`cmma_cli.evaluate.metrics` (``first_relevant_ranks``, ties broken pessimistically),
the code ``cmma evaluate`` scores retrieval with, so the two never disagree on the same embeddings.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cmma_cli.evaluate import metrics as M
from cmma_cli.loss import MultiModalInfoNCE, pair_name, property_loss
from cmma_cli.modalities.batches import MaterialSet, to_device

#: Queries scored at once in R@1 (bounds the similarity block held in memory).
R1_CHUNK = 1024


def recall_at_1(queries: np.ndarray, gallery: np.ndarray) -> float:
    """Share of ``queries[i]`` whose nearest gallery vector (inner product) is ``gallery[i]`` (pessimistic ties)."""
    n = len(queries)
    ranks = []
    for start in range(0, n, R1_CHUNK):
        sim = queries[start : start + R1_CHUNK] @ gallery.T
        relevant = np.zeros(sim.shape, dtype=bool)
        relevant[np.arange(len(sim)), np.arange(start, start + len(sim))] = True
        ranks.append(M.first_relevant_ranks(sim, relevant))
    return M.recall_at_k(np.concatenate(ranks), 1)


def _forward(model, materials: MaterialSet, chunk: np.ndarray, device: torch.device, autocast, predicting: bool,
             size: int) -> tuple[dict, dict, torch.Tensor, list]:
    """The collated batch of ``chunk`` (masks, targets) and the model's output on it, in forward passes of ``size``."""
    if len(chunk) <= size:
        batch = to_device(materials.collate(chunk), device)
        with autocast:
            f, scale, *p = model(batch["inputs"], batch["masks"], with_predictions=predicting)
        return batch, f, scale, p
    pieces = []
    for part in np.array_split(chunk, math.ceil(len(chunk) / size)):
        batch = to_device(materials.collate(part), device)
        with autocast:
            pieces.append((batch, *model(batch["inputs"], batch["masks"], with_predictions=predicting)))
    names = list(dict.fromkeys(m for b, *_ in pieces for m in b["masks"]))
    masks = {m: torch.cat([b["masks"][m] for b, *_ in pieces]) for m in names}
    batch = {"masks": masks}
    if predicting:
        batch["targets"] = torch.cat([b["targets"] for b, *_ in pieces])

    def stack(outs: list[dict], width: int) -> dict:
        present = list(dict.fromkeys(m for o in outs for m in o))
        return {m: torch.cat([o[m] if m in o else torch.zeros(len(b["masks"][m]), width, device=device)
                              for o, (b, *_) in zip(outs, pieces)]) for m in present}

    f = stack([piece[1] for piece in pieces], model.embed_dim)
    p = [stack([piece[3] for piece in pieces], len(model.properties))] if predicting else []
    return batch, f, pieces[-1][2], p


@torch.no_grad()
def validate(model, materials: MaterialSet, rows: np.ndarray, batch_size: int, loss_fn: MultiModalInfoNCE,
             device: torch.device, autocast, rank: int = 0, objective: str = "contrastive",
             predict_weight: float = 1.0, forward_size: int | None = None) -> dict[str, float]:
    """Validation loss (per pair, in chunks of the global batch size) and retrieval R@1 over all of ``rows``.

    ``forward_size``: at most this many rows per forward pass (the micro-batch of ``--accumulate``; default
    ``batch_size``): the loss is still taken over chunks of ``batch_size``, the step's global batch.

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
            batch, f, scale, p = _forward(model, materials, chunk, device, autocast, predicting,
                                          forward_size or batch_size)
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
    z = {m: torch.cat(v).numpy() for m, v in feats.items()}
    mask = {m: torch.cat(v).numpy() for m, v in masks.items()}
    r1, chance = [], []
    for a, b in loss_fn.pairs:
        both = mask[a] & mask[b]
        n = int(both.sum())
        if n < 2:
            continue
        out[f"val_r1_{a}->{b}"] = recall_at_1(z[a][both], z[b][both])
        out[f"val_r1_{b}->{a}"] = recall_at_1(z[b][both], z[a][both])
        r1 += [out[f"val_r1_{a}->{b}"], out[f"val_r1_{b}->{a}"]]
        chance += [M.chance_recall_at_k(n, 1, 1)] * 2
    out["val_r1"] = float(np.mean(r1)) if r1 else float("nan")
    out["val_r1_chance"] = float(np.mean(chance)) if chance else float("nan")
    return out
