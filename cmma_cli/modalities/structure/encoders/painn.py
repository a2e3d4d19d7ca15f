"""PaiNN: polarizable atom interactions (Schütt et al. 2021). Equivariant vector features built from the
edge directions, so it sees bond angles the distance-only encoders cannot; the material vector stays
invariant (directions enter only through rotation invariants). Usually the strongest of the three."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch_geometric.utils import scatter

from cmma_cli.modalities.structure.encoders.base import GraphEncoder, cosine_cutoff


class PaiNNLayer(nn.Module):
    """One PaiNN message + update step on scalar (N, H) and vector (N, 3, H) features."""

    def __init__(self, hidden: int, num_rbf: int, avg_neighbors: float):
        super().__init__()
        self.hidden = hidden
        self.norm = 1.0 / math.sqrt(avg_neighbors)
        self.phi = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 3 * hidden))
        self.filter = nn.Linear(num_rbf, 3 * hidden)
        self.U = nn.Linear(hidden, hidden, bias=False)
        self.V = nn.Linear(hidden, hidden, bias=False)
        self.update = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, 3 * hidden))
        self.layer_norm = nn.LayerNorm(hidden)

    def forward(self, s, v, edge_index, rbf, fcut, unit):
        j, i = edge_index
        n, h = s.shape[0], self.hidden
        x = self.phi(s)[j] * self.filter(rbf) * fcut[:, None]
        ds, dvv, dvs = x.split(h, dim=-1)
        dv = v[j] * dvv[:, None, :] + dvs[:, None, :] * unit[:, :, None]
        s = s + self.norm * scatter(ds, i, dim=0, dim_size=n, reduce="sum")
        v = v + self.norm * scatter(dv, i, dim=0, dim_size=n, reduce="sum")
        uv, vv = self.U(v), self.V(v)
        vnorm = torch.sqrt((vv * vv).sum(dim=1) + 1e-8)
        a_vv, a_sv, a_ss = self.update(torch.cat([s, vnorm], dim=-1)).split(h, dim=-1)
        v = v + a_vv[:, None, :] * uv
        s = s + a_sv * (uv * vv).sum(dim=1) + a_ss
        return self.layer_norm(s), v


class PaiNN(GraphEncoder):
    def build(self, hidden: int, layers: int, num_rbf: int, cutoff: float, avg_neighbors: float) -> None:
        self.blocks = nn.ModuleList(PaiNNLayer(hidden, num_rbf, avg_neighbors) for _ in range(layers))

    def interact(self, h: torch.Tensor, inputs: dict[str, torch.Tensor], rbf: torch.Tensor) -> torch.Tensor:
        dist = inputs["dist"]
        fcut = cosine_cutoff(dist, self.cutoff)
        unit = inputs["vec"] / dist.clamp_min(1e-6)[:, None]
        v = h.new_zeros(h.shape[0], 3, h.shape[1])
        for block in self.blocks:
            h, v = block(h, v, inputs["edge_index"], rbf, fcut, unit)
        return h
