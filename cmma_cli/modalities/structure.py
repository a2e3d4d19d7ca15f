"""Crystal structure: a message-passing network over the periodic radius graph (PyTorch Geometric).

Inputs are the graphs ``cmma preprocess`` stored (atomic numbers, directed edges centre -> neighbour,
edge distances and cartesian edge vectors, periodic images included), so no neighbour search runs at
training time. Messages flow from the neighbour to the centre atom. Three architectures, by name:

- ``schnet`` (default): continuous-filter convolutions on a Gaussian radial basis (Schütt et al. 2018),
  PyTorch Geometric's own interaction blocks, with residual updates.
- ``cgcnn``: crystal-graph convolutions (Xie & Grossman 2018), PyG's ``CGConv`` with layer norm.
- ``painn``: polarizable atom interactions (Schütt et al. 2021); equivariant vector features built
  from the edge directions, so it sees bond angles the two above cannot. Usually the strongest.

All three see only distances (and, for PaiNN, directions combined into rotation invariants),
atom types and graph connectivity, and pool atoms by mean or sum: the material vector is invariant
to rotation, translation and the order of the sites.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn
from torch_geometric.nn import CGConv
from torch_geometric.nn.models.schnet import GaussianSmearing, InteractionBlock
from torch_geometric.utils import scatter

from cmma_cli.errors import CMMAError
from cmma_cli.modalities.base import Context, Modality, Prepared, csr, ragged_index

ARCHITECTURES = ("schnet", "cgcnn", "painn")
POOLINGS = ("mean", "sum")
#: Atomic numbers 1..118 (0 is never used).
NUM_ELEMENTS = 119


@dataclass
class StructureData(Prepared):
    """Graphs of every row as flat arrays with offsets (CSR), ready for vectorised batching."""

    present: np.ndarray
    z: np.ndarray  # (total atoms,) int64
    node_offsets: np.ndarray  # (rows + 1,)
    src: np.ndarray  # (total edges,) int64, centre atom (local index)
    dst: np.ndarray  # (total edges,) int64, neighbour (local index)
    dist: np.ndarray  # (total edges,) float32
    vec: np.ndarray  # (total edges, 3) float32
    edge_offsets: np.ndarray  # (rows + 1,)


class StructureModality(Modality):
    name = "structure"
    columns = ("atomic_numbers", "edge_src", "edge_dst", "edge_dist", "edge_vec")

    def spec(self, cfg: Any, table: pa.Table | None, ctx: Context) -> dict[str, Any]:
        if cfg.structure_encoder not in ARCHITECTURES:
            raise CMMAError(
                f"--structure-encoder must be one of {', '.join(ARCHITECTURES)}, not {cfg.structure_encoder!r}."
            )
        if cfg.pooling not in POOLINGS:
            raise CMMAError(f"--pooling must be one of {', '.join(POOLINGS)}, not {cfg.pooling!r}.")
        cutoff = float(ctx.processed_manifest.get("config", {}).get("cutoff", 5.0))
        avg_neighbors = 1.0
        if table is not None:
            atoms = pc.sum(pc.list_value_length(table.column("atomic_numbers"))).as_py() or 0
            edges = pc.sum(pc.list_value_length(table.column("edge_src"))).as_py() or 0
            avg_neighbors = max(1.0, edges / max(atoms, 1))
        return {
            "architecture": cfg.structure_encoder,
            "hidden": cfg.structure_hidden,
            "layers": cfg.structure_layers,
            "num_rbf": cfg.num_rbf,
            "cutoff": cutoff,
            "pooling": cfg.pooling,
            "avg_neighbors": round(float(avg_neighbors), 3),
        }

    def prepare(self, table: pa.Table, spec: dict[str, Any], ctx: Context) -> StructureData:
        z, node_off, present = csr(table.column("atomic_numbers"), np.int64)
        src, edge_off, _ = csr(table.column("edge_src"), np.int64)
        dst, _, _ = csr(table.column("edge_dst"), np.int64)
        dist, _, _ = csr(table.column("edge_dist"), np.float32)
        vec, _, _ = csr(table.column("edge_vec"), np.float32)
        return StructureData(present, z, node_off, src, dst, dist, vec.reshape(-1, 3), edge_off)

    def collate(self, data: StructureData, rows: np.ndarray, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        """One disjoint union graph: node indices shifted per material, ``batch`` maps atoms to rows."""
        nodes, node_counts = ragged_index(data.node_offsets, rows)
        edges, edge_counts = ragged_index(data.edge_offsets, rows)
        first_node = np.concatenate(([0], np.cumsum(node_counts)[:-1]))
        shift = np.repeat(first_node, edge_counts)
        # PyG convention: edge_index[0] sends (the neighbour), edge_index[1] receives (the centre atom)
        edge_index = np.stack([data.dst[edges] + shift, data.src[edges] + shift])
        return {
            "z": torch.from_numpy(data.z[nodes]),
            "edge_index": torch.from_numpy(edge_index),
            "dist": torch.from_numpy(data.dist[edges]),
            "vec": torch.from_numpy(data.vec[edges]),
            "batch": torch.from_numpy(np.repeat(np.arange(len(rows), dtype=np.int64), node_counts)),
            "num_nodes": torch.from_numpy(node_counts),
        }

    def encoder(self, spec: dict[str, Any]) -> nn.Module:
        return StructureEncoder(**{k: spec[k] for k in ("architecture", "hidden", "layers", "num_rbf", "cutoff",
                                                        "pooling", "avg_neighbors")})


def cosine_cutoff(dist: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Smoothly 1 -> 0 between distance 0 and the cutoff."""
    return 0.5 * (torch.cos(dist * math.pi / cutoff) + 1.0) * (dist < cutoff)


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


class StructureEncoder(nn.Module):
    """Atom-type embeddings -> ``layers`` message-passing steps on a radial basis -> atom MLP -> pooling."""

    def __init__(self, architecture: str = "schnet", hidden: int = 128, layers: int = 3, num_rbf: int = 50,
                 cutoff: float = 5.0, pooling: str = "mean", avg_neighbors: float = 1.0):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown structure architecture {architecture!r}")
        self.architecture, self.cutoff, self.pooling = architecture, cutoff, pooling
        self.out_dim = hidden
        self.embedding = nn.Embedding(NUM_ELEMENTS, hidden)
        self.rbf = GaussianSmearing(0.0, cutoff, num_rbf)
        if architecture == "schnet":
            self.blocks = nn.ModuleList(InteractionBlock(hidden, num_rbf, hidden, cutoff) for _ in range(layers))
        elif architecture == "cgcnn":
            self.blocks = nn.ModuleList(CGConv(hidden, dim=num_rbf, aggr="mean") for _ in range(layers))
            self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        else:
            self.blocks = nn.ModuleList(PaiNNLayer(hidden, num_rbf, avg_neighbors) for _ in range(layers))
        self.atom_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        z, edge_index, dist = inputs["z"], inputs["edge_index"], inputs["dist"]
        h = self.embedding(z)
        rbf = self.rbf(dist)
        if self.architecture == "schnet":
            for block in self.blocks:
                h = h + block(h, edge_index, dist, rbf)
        elif self.architecture == "cgcnn":
            edge_attr = rbf * cosine_cutoff(dist, self.cutoff)[:, None]
            for block, norm in zip(self.blocks, self.norms):
                h = norm(nn.functional.softplus(block(h, edge_index, edge_attr)))
        else:
            fcut = cosine_cutoff(dist, self.cutoff)
            unit = inputs["vec"] / dist.clamp_min(1e-6)[:, None]
            v = h.new_zeros(h.shape[0], 3, h.shape[1])
            for block in self.blocks:
                h, v = block(h, v, edge_index, rbf, fcut, unit)
        h = self.atom_mlp(h)
        return scatter(h, inputs["batch"], dim=0, dim_size=inputs["num_nodes"].shape[0], reduce=self.pooling)
