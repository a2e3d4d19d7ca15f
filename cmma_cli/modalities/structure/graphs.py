"""Crystal graphs for the structure encoder: a periodic radius graph from pymatgen's neighbour list.

A thin adapter over :meth:`pymatgen.core.Structure.get_neighbor_list` (no neighbour search of our own),
in the spirit of matgl's ``Structure2Graph``. Every atom is a node; every (atom, periodic image of a
neighbour) pair closer than the cutoff is a directed edge, and the list is symmetric (``i -> j`` through
image ``n`` comes with ``j -> i`` through ``-n``).

Stored per edge: ``src`` (the centre atom), ``dst`` (the neighbour), the distance in Angstrom and the
cartesian vector ``r_dst + n @ lattice - r_src``. The vectors carry the periodic image offsets, so a
model that needs directions (or wants to recompute distances) needs no pymatgen at training time.

Isolated atoms (no neighbour within the cutoff) stay in the graph as nodes without edges: a message
passing layer simply sends them nothing, and pooling still sees their species. No fake self-loop
edge is invented; :attr:`CrystalGraph.isolated` counts them so the summary can report them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pymatgen.core import Structure

#: Neighbours whose distance ties with the last one kept under ``max_neighbors`` (within this many
#: Angstrom) are kept too, so the graph never depends on the order of the sites.
TIE_TOLERANCE = 1e-5


class StructureRejected(ValueError):
    """A structure that cannot become a usable graph; the message is the reason written to rejects."""


@dataclass
class CrystalGraph:
    """One structure as arrays: nodes, directed edges, distances and flattened edge vectors."""

    atomic_numbers: np.ndarray  # (N,) int16
    edge_src: np.ndarray  # (E,) int32, the centre atom
    edge_dst: np.ndarray  # (E,) int32, the neighbour
    edge_dist: np.ndarray  # (E,) float32, Angstrom
    edge_vec: np.ndarray  # (E*3,) float32, cartesian r_dst(image) - r_src, flattened row-major

    @property
    def num_edges(self) -> int:
        return int(self.edge_src.shape[0])

    @property
    def isolated(self) -> int:
        """How many atoms have no neighbour within the cutoff."""
        return int(self.atomic_numbers.shape[0] - np.unique(self.edge_src).shape[0])


def build_graph(
    structure: Structure,
    cutoff: float = 5.0,
    max_neighbors: int | None = None,
    min_distance: float = 0.5,
) -> CrystalGraph:
    """The periodic radius graph of ``structure``.

    ``max_neighbors`` keeps each atom's nearest neighbours only (ties with the last kept distance are
    all kept). Raises :class:`StructureRejected` when two atoms (or an atom and a periodic image of
    itself) are closer than ``min_distance`` Angstrom (overlapping sites mean a broken structure), or
    when a site is disordered (a partial or mixed occupancy has no single atomic number).
    """
    atomic_numbers, cart = _sites(structure)
    center, neighbor, images, dist = structure.get_neighbor_list(r=cutoff)
    if dist.size and dist.min() < min_distance:
        k = int(np.argmin(dist))
        raise StructureRejected(
            f"overlapping atoms: sites {int(center[k])} and {int(neighbor[k])} are {dist[k]:.3f} A apart "
            f"(minimum {min_distance} A)"
        )
    if max_neighbors is not None and dist.size:
        center, neighbor, images, dist = _nearest(center, neighbor, images, dist, len(structure), max_neighbors)
    vec = np.take(cart, neighbor, axis=0)  # np.take: faster than fancy indexing on these small arrays
    vec -= np.take(cart, center, axis=0)
    vec += images @ structure.lattice.matrix
    return CrystalGraph(
        atomic_numbers=atomic_numbers,
        edge_src=center.astype(np.int32),
        edge_dst=neighbor.astype(np.int32),
        edge_dist=dist.astype(np.float32),
        edge_vec=vec.astype(np.float32).reshape(-1),
    )


def _sites(structure: Structure) -> tuple[np.ndarray, np.ndarray]:
    """Atomic numbers and cartesian coordinates in one pass over the sites.

    :class:`StructureRejected` for a site with partial or mixed occupancy (no single atomic number).
    """
    numbers, coords = [], []
    for site in structure.sites:
        species = site.species
        if len(species) == 1 and species.num_atoms == 1:
            numbers.append(next(iter(species)).Z)
            coords.append(site.coords)
            continue
        raise StructureRejected(f"disordered site {len(numbers)} ({species}): order the structure first")
    return np.array(numbers, dtype=np.int16), np.array(coords, dtype=float).reshape(-1, 3)


def _nearest(center, neighbor, images, dist, n_sites: int, k: int):
    """Keep each centre's ``k`` nearest neighbours (plus ties), ordered by centre then distance."""
    if k < 1:
        raise ValueError("max_neighbors must be at least 1")
    order = np.lexsort((dist, center))
    center, neighbor, images, dist = center[order], neighbor[order], images[order], dist[order]
    rank = np.arange(center.size) - np.searchsorted(center, center, side="left")
    kth = np.full(n_sites, np.inf)
    at_k = rank == k - 1
    kth[center[at_k]] = dist[at_k]
    keep = dist <= kth[center] + TIE_TOLERANCE
    return center[keep], neighbor[keep], images[keep], dist[keep]
