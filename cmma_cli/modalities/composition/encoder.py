"""The composition encoder: self-attention over a composition's elements, pooled by their fractions.

Each element is a token: its vector (``nn.Embedding`` over H..Lr, started at random or from the shipped mat2vec
embeddings) plus an embedding of its fraction (the fraction and its logarithm through a small MLP). Two (by
default) pre-norm transformer layers let the elements see each other (the same Li means something else beside
Fe and P than beside Co and O); there are no positions, so the order of the elements is irrelevant, and the
fractions are normalised, so the formula's scale is too. Padding slots are masked and carry zero weight.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import torch
from torch import nn

from cmma_cli.composition import ELEMENTS, INDEX

#: The pretrained element vectors shipped with cmma (matminer's copy of the mat2vec embeddings; see its README).
MATSCHOLAR = ("cmma_cli", "data/element_embeddings/matscholar_els.json")


def matscholar_table() -> torch.Tensor:
    """(len(ELEMENTS), 200) float32: the shipped mat2vec element vectors, each scaled to unit length."""
    package, name = MATSCHOLAR
    table = json.loads(resources.files(package).joinpath(name).read_text())
    rows = torch.zeros(len(ELEMENTS), len(next(iter(table.values()))))
    for el, vector in table.items():
        if el in INDEX:
            rows[INDEX[el]] = torch.tensor(vector, dtype=torch.float32)
    return nn.functional.normalize(rows, dim=1)


class CompositionEncoder(nn.Module):
    """``{"elements": (rows, width) long, "fractions": (rows, width)}`` (zero-padded) -> (rows, out_dim)."""

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        dim = spec["dim"]
        if spec.get("init", "random") == "matscholar":
            table = matscholar_table()
            self.elements = nn.Embedding.from_pretrained(table, freeze=False)
            self.element_proj = nn.Linear(table.shape[1], dim)
        else:
            self.elements = nn.Embedding(len(ELEMENTS), dim)
            self.element_proj = nn.Identity()
        self.fraction = nn.Sequential(nn.Linear(2, dim), nn.SiLU(), nn.Linear(dim, dim))
        layer = nn.TransformerEncoderLayer(dim, spec["heads"], 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.attention = nn.TransformerEncoder(layer, spec["layers"], enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, spec["out_dim"])
        self.out_dim = spec["out_dim"]

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        elements, fractions = inputs["elements"], inputs["fractions"].float()
        pad = fractions <= 0
        weights = fractions / fractions.sum(1, keepdim=True).clamp_min(1e-12)
        f = torch.stack([weights, torch.log(weights.clamp_min(1e-6))], dim=-1)
        h = self.element_proj(self.elements(elements)) + self.fraction(f)
        h = self.attention(h, src_key_padding_mask=pad)
        h = self.norm(h)
        return self.out((h * weights.unsqueeze(-1)).sum(1))
