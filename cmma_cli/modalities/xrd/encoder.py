"""The XRD encoder: a small 1-D CNN in plain torch.

It takes the square root of the intensities (weak reflections matter for identification as much as
strong ones), runs four strided convolutions, then max-pools to a fixed number of 2-theta windows and
flattens them, so *where* a peak sits (the lattice spacing) survives, not only its shape.
"""

from __future__ import annotations

import torch
from torch import nn


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
