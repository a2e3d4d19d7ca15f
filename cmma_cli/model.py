"""The CMMA model: one encoder per modality, an MLP projection head each, one shared space, one temperature.

    z_k = normalize(g_k(f_k(x_k)))        f_k: the modality's encoder, g_k: Linear-GELU-Linear to d dims

The logit scale ``s = exp(t)`` is learnt as in CLIP: ``t`` starts at ``log(1 / 0.07)`` and is clamped
so ``s`` never exceeds 100. A model is fully described by its *spec* (a JSON-able dict: modalities,
dimensions and each encoder's facts), which checkpoints store next to the weights, so
:func:`load_model` rebuilds it without the processed data (what ``cmma embed`` needs).

With a predict objective (``cmma train --objective predict``) the model also has a property head, one
linear map shared by every modality, ``y_k = W (sqrt(d) z_k) + b``, predicting the standardised
properties the spec lists (``spec["predict"]``: names, train-split mean and std; a spec without it has
no head). The embeddings stay the normalised projections ``z_k`` whatever the objective.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from cmma_cli import __version__
from cmma_cli.errors import CMMAError
from cmma_cli.modalities import get_modality
from cmma_cli.modalities.base import Context
from cmma_cli.modalities.batches import encoder_inputs, pool_items
from cmma_cli.workspace import atomic

#: CLIP's cap on the logit scale (a temperature of 0.01).
MAX_LOGIT_SCALE = 100.0
CHECKPOINT_FORMAT = 1


def model_spec(cfg: Any, table: pa.Table | None, ctx: Context) -> dict[str, Any]:
    """The spec of the model a :class:`~cmma_cli.config.TrainConfig` asks for, measured on ``table``."""
    if cfg.embed_dim < 2 or cfg.proj_hidden < 1:
        raise CMMAError(f"--embed-dim must be at least 2 and --proj-hidden at least 1, not {cfg.embed_dim} and {cfg.proj_hidden}.")
    if not 0 < cfg.temperature < 1:
        raise CMMAError(f"--temperature must be between 0 and 1 (CLIP starts at 0.07), not {cfg.temperature}.")
    return {
        "modalities": list(cfg.modalities),
        "embed_dim": cfg.embed_dim,
        "proj_hidden": cfg.proj_hidden,
        "temperature": cfg.temperature,
        "learn_temperature": cfg.learn_temperature,
        "encoders": {m: get_modality(m).spec(getattr(cfg, m, None), table, ctx) for m in cfg.modalities},
        **({"predict": predict_spec(cfg, table, ctx)} if cfg.predicts else {}),
    }


def predict_spec(cfg: Any, table: pa.Table, ctx: Context) -> dict[str, Any]:
    """The property head's targets: ``{"properties", "mean", "std"}`` measured on the train ``table``.

    The candidates are the processed manifest's properties that :func:`~cmma_cli.properties.numeric_properties`
    regresses and that some row of ``table`` has a number for; ``cfg.predict_properties`` picks among them
    (empty: all). A property with a single value or no spread gets std 1.
    """
    import numpy as np
    import pandas as pd

    from cmma_cli.properties import numeric_properties

    candidates = [c for c in ctx.processed_manifest.get("properties", []) if c in table.column_names]
    frame = table.select(candidates).to_pandas()
    values = {}
    for p in numeric_properties(frame, candidates):
        v = pd.to_numeric(frame[p], errors="coerce").to_numpy(np.float64)
        values[p] = v[np.isfinite(v)]
    available = [p for p, v in values.items() if len(v)]
    if not available:
        raise CMMAError(f"--objective {cfg.objective} needs a numeric property with values in the train split and "
                        "the processed data has none: train with --objective contrastive.")
    wanted = list(dict.fromkeys(cfg.predict_properties)) or available
    missing = [p for p in wanted if p not in available]
    if missing:
        raise CMMAError(f"--predict-properties names {', '.join(missing)}, which no train material of the processed "
                        f"data has a number for: choose from {', '.join(available)}.")
    std = [float(values[p].std()) for p in wanted]
    return {"properties": wanted, "mean": [float(values[p].mean()) for p in wanted],
            "std": [s if s > 0 else 1.0 for s in std]}


class ProjectionHead(nn.Module):
    """g_k: encoder output -> the shared space (not yet normalised)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CMMAModel(nn.Module):
    """Encoders + projection heads + the learnable logit scale (+ the property head), built from a spec."""

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        self.spec = spec
        self.modalities: list[str] = list(spec["modalities"])
        self.embed_dim = int(spec["embed_dim"])
        self.encoders = nn.ModuleDict({m: get_modality(m).encoder(spec["encoders"][m]) for m in self.modalities})
        self.heads = nn.ModuleDict(
            {m: ProjectionHead(self.encoders[m].out_dim, spec["proj_hidden"], self.embed_dim) for m in self.modalities}
        )
        init = torch.tensor(math.log(1.0 / spec["temperature"]), dtype=torch.float32)
        self.logit_scale = nn.Parameter(init, requires_grad=bool(spec["learn_temperature"]))
        # z is a unit vector (components ~ 1/sqrt(d)): the fixed factor sqrt(d) gives the head inputs of unit
        # scale, as nn.Linear's init and the learning rate assume, so it reaches standardised targets (std 1)
        # in few steps without large weights, and d does not change how fast it learns
        self.properties: list[str] = list(spec["predict"]["properties"]) if "predict" in spec else []
        self.predictor = nn.Linear(self.embed_dim, len(self.properties)) if self.properties else None

    def embed(self, modality: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised float32 embeddings ``(rows, d)`` of one modality's collated inputs (several items of one
        material, such as its synthesis texts, pooled after the head into the direction of their mean)."""
        h = self.heads[modality](self.encoders[modality](encoder_inputs(inputs)))
        return pool_items(F.normalize(h.float(), dim=-1), inputs, normalise=True)

    def forward(self, inputs: dict[str, dict[str, torch.Tensor]], masks: dict[str, torch.Tensor],
                with_predictions: bool = False) -> tuple:
        """``({modality: (B, d)}, logit scale)`` for every modality in ``inputs``; rows whose mask is False are zero.

        The scale is returned from ``forward`` (as CLIP does) so DDP sees the temperature as used.
        ``with_predictions`` (a model with a property head): a third item, ``{modality: (B, P)}`` standardised
        property predictions from each modality's embedding (computed here, so DDP sees the head as used).
        """
        out = {}
        for m, x in inputs.items():
            z = self.embed(m, x)
            full = z.new_zeros(masks[m].shape[0], self.embed_dim)
            out[m] = full.index_put((masks[m],), z)
        if not with_predictions:
            return out, self.scale()
        return out, self.scale(), {m: self.predict(z) for m, z in out.items()}

    def predict(self, z: torch.Tensor) -> torch.Tensor:
        """Standardised property predictions ``(rows, P)`` from normalised embeddings ``z`` (needs the head)."""
        if self.predictor is None:
            raise CMMAError("This model was trained without a property head: train with --objective predict.")
        return self.predictor(z.float() * math.sqrt(self.embed_dim))

    def scale(self) -> torch.Tensor:
        """The logit scale ``s = exp(t)``, at most 100."""
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep ``t`` in [0, log 100] (call after each optimizer step, as CLIP does)."""
        self.logit_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))


# ----------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Write a checkpoint atomically (see :func:`cmma_cli.workspace.atomic`)."""
    with atomic(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, "version": __version__, **state}, tmp)
    return Path(path)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint`, or one sentence saying what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise CMMAError(f"Checkpoint {path} does not exist: pass a .pt file from runs/<run>/checkpoints/ or --resume latest.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CMMAError(f"{path} is not a readable cmma checkpoint ({type(exc).__name__}): pass another file.") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "spec" not in ckpt:
        raise CMMAError(f"{path} is not a cmma checkpoint of this version's format: retrain with `cmma train`.")
    return ckpt


def spec_mismatch(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The settings in which two specs differ, as ``name: saved -> wanted`` (data-measured facts ignored)."""
    diffs = []
    if sorted(saved["modalities"]) != sorted(wanted["modalities"]):
        diffs.append(f"modalities {','.join(saved['modalities'])} -> {','.join(wanted['modalities'])}")
    for key in ("embed_dim", "proj_hidden"):
        if saved[key] != wanted[key]:
            diffs.append(f"{key} {saved[key]} -> {wanted[key]}")
    heads = [(spec.get("predict") or {}).get("properties", []) for spec in (saved, wanted)]
    if heads[0] != heads[1]:
        diffs.append(f"predicted properties {','.join(heads[0]) or '(none)'} -> {','.join(heads[1]) or '(none)'}")
    for m in set(saved["modalities"]) & set(wanted["modalities"]):
        a, b = saved["encoders"][m], wanted["encoders"][m]
        for key in sorted((set(a) | set(b)) - get_modality(m).derived_keys):
            if a.get(key) != b.get(key):
                diffs.append(f"{m} {key} {a.get(key)} -> {b.get(key)}")
    return diffs


def build_model(spec: dict[str, Any], for_loading: bool = False) -> CMMAModel:
    """A fresh model from ``spec``; ``for_loading`` skips downloading pretrained weights the checkpoint replaces."""
    if for_loading:
        spec = {**spec, "encoders": {m: get_modality(m).loading_spec(s) for m, s in spec["encoders"].items()}}
    return CMMAModel(spec)


def load_model(path: Path, device: str | torch.device = "cpu",
               modalities: list[str] | None = None) -> tuple[CMMAModel, dict[str, Any]]:
    """The trained model of a checkpoint (eval mode, on ``device``) and the checkpoint itself.

    ``modalities`` (default: all of the checkpoint's): build and load only those modalities' encoders and heads
    (what one query needs: a pattern query does not build the structure backbone); see :func:`add_modalities`.
    """
    ckpt = read_checkpoint(path)
    model = part_model(ckpt, ckpt["spec"]["modalities"] if modalities is None else modalities)
    return model.to(device).eval(), ckpt


def part_model(ckpt: dict[str, Any], modalities: list[str]) -> CMMAModel:
    """The checkpoint's model with the encoders and heads of ``modalities`` only (the checkpoint's order), its
    weights loaded from the checkpoint (strictly: every other weight, logit scale and property head included)."""
    spec = ckpt["spec"]
    wanted = [m for m in spec["modalities"] if m in modalities]
    if wanted != list(spec["modalities"]):
        spec = {**spec, "modalities": wanted, "encoders": {m: spec["encoders"][m] for m in wanted}}
    model = build_model(spec, for_loading=True)
    left_out = tuple(f"{part}.{m}." for m in ckpt["spec"]["modalities"] if m not in wanted
                     for part in ("encoders", "heads"))
    model.load_state_dict({k: v for k, v in ckpt["model"].items() if not k.startswith(left_out)})
    return model


def add_modalities(model: CMMAModel, ckpt: dict[str, Any], modalities: list[str],
                   device: str | torch.device = "cpu") -> None:
    """Build and load (from ``ckpt``, the checkpoint ``model`` came from) the encoders and heads of ``modalities``
    that ``model`` does not have yet, in eval mode on ``device``."""
    missing = [m for m in ckpt["spec"]["modalities"] if m in modalities and m not in model.encoders]
    if not missing:
        return
    part = part_model(ckpt, missing).to(device).eval()
    for m in missing:
        model.encoders[m], model.heads[m] = part.encoders[m], part.heads[m]
    model.modalities = [m for m in ckpt["spec"]["modalities"] if m in model.encoders]
    model.spec = {**model.spec, "modalities": list(model.modalities),
                  "encoders": {**model.spec["encoders"], **part.spec["encoders"]}}
