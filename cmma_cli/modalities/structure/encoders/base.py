"""What every structure encoder shares: atom-type embeddings, a Gaussian radial basis of the edge
distances, an atom MLP after the message passing, and pooling atoms into one vector per material.

Subclasses implement :meth:`GraphEncoder.interact` (the message passing on atom features). The attribute
names (``embedding``, ``rbf``, ``blocks``, ``atom_mlp``) are part of the checkpoint format.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import nn
from torch_geometric.nn.models.schnet import GaussianSmearing
from torch_geometric.utils import scatter

#: Atomic numbers 1..118 (0 is never used).
NUM_ELEMENTS = 119


def cosine_cutoff(dist: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Smoothly 1 -> 0 between distance 0 and the cutoff."""
    return 0.5 * (torch.cos(dist * math.pi / cutoff) + 1.0) * (dist < cutoff)


class GraphEncoder(nn.Module, ABC):
    """Atom-type embeddings -> :meth:`interact` (``layers`` message-passing steps) -> atom MLP -> pooling."""

    def __init__(self, hidden: int = 128, layers: int = 3, num_rbf: int = 50, cutoff: float = 5.0,
                 pooling: str = "mean", avg_neighbors: float = 1.0):
        super().__init__()
        self.cutoff, self.pooling = cutoff, pooling
        self.out_dim = hidden
        self.embedding = nn.Embedding(NUM_ELEMENTS, hidden)
        self.rbf = GaussianSmearing(0.0, cutoff, num_rbf)
        self.build(hidden, layers, num_rbf, cutoff, avg_neighbors)  # before atom_mlp: the seeded init order
        self.atom_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    @abstractmethod
    def build(self, hidden: int, layers: int, num_rbf: int, cutoff: float, avg_neighbors: float) -> None:
        """Create the message-passing modules (``self.blocks``, ...)."""

    @abstractmethod
    def interact(self, h: torch.Tensor, inputs: dict[str, torch.Tensor], rbf: torch.Tensor) -> torch.Tensor:
        """Atom features ``(atoms, hidden)`` after message passing."""

    def atoms(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-atom features ``(atoms, out_dim)`` before pooling (what attributions project)."""
        h = self.embedding(inputs["z"])
        return self.atom_mlp(self.interact(h, inputs, self.rbf(inputs["dist"])))

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return scatter(self.atoms(inputs), inputs["batch"], dim=0, dim_size=inputs["num_nodes"].shape[0],
                       reduce=self.pooling)
