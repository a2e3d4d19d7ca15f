"""CGCNN: crystal-graph convolutions (Xie & Grossman 2018), PyG's ``CGConv`` with layer norm, on the radial
basis of the edge distances times a cosine cutoff."""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn import CGConv

from cmma_cli.modalities.structure.encoders.base import GraphEncoder, cosine_cutoff


class CGCNN(GraphEncoder):
    def build(self, hidden: int, layers: int, num_rbf: int, cutoff: float, avg_neighbors: float) -> None:
        self.blocks = nn.ModuleList(CGConv(hidden, dim=num_rbf, aggr="mean") for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))

    def interact(self, h: torch.Tensor, inputs: dict[str, torch.Tensor], rbf: torch.Tensor) -> torch.Tensor:
        edge_attr = rbf * cosine_cutoff(inputs["dist"], self.cutoff)[:, None]
        for block, norm in zip(self.blocks, self.norms):
            h = norm(nn.functional.softplus(block(h, inputs["edge_index"], edge_attr)))
        return h
