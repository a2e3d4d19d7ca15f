"""SchNet: continuous-filter convolutions on a Gaussian radial basis (Schütt et al. 2018), PyTorch
Geometric's own interaction blocks, with residual updates. Sees distances only."""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn.models.schnet import InteractionBlock

from cmma_cli.modalities.structure.encoders.base import GraphEncoder


class SchNet(GraphEncoder):
    def build(self, hidden: int, layers: int, num_rbf: int, cutoff: float, avg_neighbors: float) -> None:
        self.blocks = nn.ModuleList(InteractionBlock(hidden, num_rbf, hidden, cutoff) for _ in range(layers))

    def interact(self, h: torch.Tensor, inputs: dict[str, torch.Tensor], rbf: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = h + block(h, inputs["edge_index"], inputs["dist"], rbf)
        return h
