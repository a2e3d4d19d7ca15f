"""Powder XRD patterns (and other 1-D spectra on a fixed grid): a small 1-D CNN in plain torch.

``cmma preprocess`` puts every pattern on one 2-theta grid, scaled so its strongest point is 1. The
encoder takes the square root of the intensities (weak reflections matter for identification as much as
strong ones), runs four strided convolutions, then max-pools to a fixed number of 2-theta windows and
flattens them, so *where* a peak sits (the lattice spacing) survives, not only its shape.

Training batches are augmented (``xrd_augment``) the way real measurements differ from computed
patterns: a zero-point shift of up to 0.15 degrees and a smooth intensity modulation along 2-theta.
Evaluation never augments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from cmma_cli.errors import CMMAError
from cmma_cli.modalities.base import Context, Modality, Prepared, csr


#: Training augmentation: a zero-point shift of up to this many degrees 2-theta, and a smooth intensity
#: modulation (log-normal, this standard deviation, at AUGMENT_KNOTS points) as texture and absorption cause.
AUGMENT_SHIFT_DEG = 0.15
AUGMENT_INTENSITY_SD = 0.15
AUGMENT_KNOTS = 8


@dataclass
class PatternData(Prepared):
    present: np.ndarray
    patterns: np.ndarray  # (rows with a pattern, length) float32
    position: np.ndarray  # (rows,) int64: the row of ``patterns`` of each table row, -1 when absent
    augment: bool = False
    max_shift: int = 0  # grid points


def augment(patterns: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
    """Patterns as a real measurement might give them: shifted by a few grid points (zero-point error) and
    with intensities modulated smoothly along 2-theta (preferred orientation, absorption), rescaled to max 1."""
    n, length = patterns.shape
    shifts = rng.integers(-max_shift, max_shift + 1, size=n)
    out = np.zeros_like(patterns, dtype=np.float32)
    for i, shift in enumerate(shifts):  # a slice copy per pattern: cheaper than fancy indexing
        if shift >= 0:
            out[i, shift:] = patterns[i, : length - shift]
        else:
            out[i, :shift] = patterns[i, -shift:]
    knots = np.exp(rng.normal(0.0, AUGMENT_INTENSITY_SD, size=(n, AUGMENT_KNOTS))).astype(np.float32)
    grid = np.linspace(0, AUGMENT_KNOTS - 1, length, dtype=np.float32)
    lo = np.floor(grid).astype(np.int64).clip(0, AUGMENT_KNOTS - 2)
    frac = grid - lo
    out *= knots[:, lo] * (1 - frac) + knots[:, lo + 1] * frac
    peak = out.max(axis=1, keepdims=True)
    out /= np.where(peak > 0, peak, 1.0)
    return out


class XRDModality(Modality):
    name = "xrd"
    columns = ("xrd",)

    def spec(self, cfg: Any, table: pa.Table | None, ctx: Context) -> dict[str, Any]:
        length = ctx.processed_manifest.get("xrd_grid", {}).get("size")
        if length is None and table is not None and "xrd" in table.column_names:
            values, offsets, valid = csr(table.column("xrd"), np.float32)
            lengths = np.diff(offsets)[valid]
            length = int(lengths[0]) if lengths.size else None
        if not length:
            raise CMMAError("The processed data has no XRD grid: rerun `cmma preprocess` with --xrd, "
                            "or train without the xrd modality (--modalities structure,text).")
        step = ctx.processed_manifest.get("xrd_grid", {}).get("step", 0.05)
        return {"length": int(length), "channels": cfg.xrd_channels, "out_dim": cfg.xrd_out_dim,
                "augment": cfg.xrd_augment, "max_shift": int(round(AUGMENT_SHIFT_DEG / step))}

    def prepare(self, table: pa.Table, spec: dict[str, Any], ctx: Context) -> PatternData:
        values, offsets, valid = csr(table.column("xrd"), np.float32)
        lengths = np.diff(offsets)[valid]
        if lengths.size and (lengths != spec["length"]).any():
            bad = int(lengths[lengths != spec["length"]][0])
            raise CMMAError(f"An XRD pattern has {bad} points where the model expects {spec['length']}: "
                            "rerun `cmma preprocess --force` so every pattern is on one grid.")
        position = np.full(len(valid), -1, dtype=np.int64)
        position[valid] = np.arange(int(valid.sum()))
        return PatternData(valid, values.reshape(-1, spec["length"]), position, spec.get("augment", False),
                           spec.get("max_shift", 0))

    def collate(self, data: PatternData, rows: np.ndarray, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        patterns = data.patterns[data.position[rows]]
        if rng is not None and data.augment:
            patterns = augment(patterns, rng, data.max_shift)
        return {"pattern": torch.from_numpy(patterns)}

    def encoder(self, spec: dict[str, Any]) -> nn.Module:
        return PatternEncoder(spec["length"], spec["channels"], spec["out_dim"])


def _block(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(c_in, c_out, kernel, stride=2, padding=kernel // 2),
        nn.GroupNorm(min(8, c_out), c_out),
        nn.GELU(),
    )


class PatternEncoder(nn.Module):
    """(rows, length) patterns -> (rows, out_dim): strided 1-D convolutions, windowed max pooling, a linear layer."""

    def __init__(self, length: int, channels: int = 32, out_dim: int = 256, windows: int = 16):
        super().__init__()
        self.length, self.out_dim = length, out_dim
        c = channels
        self.convs = nn.Sequential(_block(1, c, 9), _block(c, 2 * c, 7), _block(2 * c, 4 * c, 5), _block(4 * c, 4 * c, 5))
        self.pool = nn.AdaptiveMaxPool1d(windows)
        self.out = nn.Sequential(nn.Flatten(), nn.Linear(4 * c * windows, out_dim), nn.GELU())

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs["pattern"]
        x = torch.sqrt(x.clamp_min(0.0)).unsqueeze(1)
        return self.out(self.pool(self.convs(x)))
