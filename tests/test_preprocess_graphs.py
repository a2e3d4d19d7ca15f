"""Crystal graphs: hand-checked neighbour shells, periodic images, isolated atoms, invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure
from scipy.spatial.transform import Rotation

from cmma_cli.modalities.structure.graphs import StructureRejected, build_graph

CU_A = 3.615  # fcc copper lattice constant (Angstrom)


def fcc_cu() -> Structure:
    return Structure(Lattice.cubic(CU_A), ["Cu"] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])


def triclinic() -> Structure:
    """A low-symmetry cell, so no invariance can hold by accident."""
    lattice = Lattice.from_parameters(4.1, 5.2, 6.3, 80, 95, 105)
    return Structure(
        lattice, ["Li", "Fe", "O", "O"], [[0.02, 0.1, 0.2], [0.5, 0.45, 0.6], [0.3, 0.8, 0.1], [0.75, 0.2, 0.85]]
    )


def edges(graph, perm: np.ndarray | None = None, rotation: np.ndarray | None = None) -> list[tuple]:
    """The edge multiset as sorted tuples, in original site numbering and (optionally) un-rotated."""
    src, dst = graph.edge_src, graph.edge_dst
    if perm is not None:  # new site k was old site perm[k]
        src, dst = perm[src], perm[dst]
    vec = graph.edge_vec.reshape(-1, 3).astype(float)
    if rotation is not None:
        vec = vec @ rotation  # rows are R @ v: undo with R^T, i.e. v = (R v) R for row vectors
    return sorted(
        (int(s), int(d), round(float(r), 3), *(round(float(x), 2) + 0.0 for x in v))
        for s, d, r, v in zip(src, dst, graph.edge_dist, vec)
    )


def test_fcc_copper_has_twelve_neighbours_at_a_over_root_two():
    graph = build_graph(fcc_cu(), cutoff=3.0)  # between the first (2.556 A) and second (3.615 A) shells
    assert list(graph.atomic_numbers) == [29] * 4
    assert np.bincount(graph.edge_src, minlength=4).tolist() == [12] * 4
    np.testing.assert_allclose(graph.edge_dist, CU_A / math.sqrt(2), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(graph.edge_vec.reshape(-1, 3), axis=1), graph.edge_dist, atol=1e-5)
    assert graph.isolated == 0


def test_second_shell_enters_with_a_larger_cutoff_and_the_cap_keeps_whole_shells():
    assert np.bincount(build_graph(fcc_cu(), cutoff=4.0).edge_src).tolist() == [18] * 4
    assert np.bincount(build_graph(fcc_cu(), cutoff=4.0, max_neighbors=12).edge_src).tolist() == [12] * 4
    # a cap inside a shell keeps the whole shell: which 8 of 12 equal neighbours would be arbitrary
    assert np.bincount(build_graph(fcc_cu(), cutoff=4.0, max_neighbors=8).edge_src).tolist() == [12] * 4
    assert np.bincount(build_graph(fcc_cu(), cutoff=4.0, max_neighbors=13).edge_src).tolist() == [18] * 4


def test_neighbours_only_through_periodic_images():
    # two atoms 5 A apart along c; within the 3 A cutoff each sees only its own images along a and b
    cell = Structure(Lattice.tetragonal(2.5, 10.0), ["Na", "Cl"], [[0, 0, 0], [0, 0, 0.5]])
    graph = build_graph(cell, cutoff=3.0)
    assert graph.num_edges == 8
    assert (graph.edge_src == graph.edge_dst).all()  # every neighbour is an image of the atom itself
    vectors = {tuple(np.round(v, 4) + 0.0) for v in graph.edge_vec.reshape(-1, 3)}
    assert vectors == {(2.5, 0, 0), (-2.5, 0, 0), (0, 2.5, 0), (0, -2.5, 0)}
    np.testing.assert_allclose(graph.edge_dist, 2.5, atol=1e-6)


def test_images_of_one_neighbour_stay_distinct_edges():
    # CsCl: all 8 nearest neighbours of Cs are the same Cl site, 7 of them through periodic images
    cscl = Structure(Lattice.cubic(4.12), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    graph = build_graph(cscl, cutoff=3.8)
    from_cs = graph.edge_src == 0
    assert from_cs.sum() == 8 and (graph.edge_dst[from_cs] == 1).all()
    vectors = {tuple(np.sign(v).astype(int)) for v in graph.edge_vec.reshape(-1, 3)[from_cs]}
    assert len(vectors) == 8  # the 8 corners (+-1, +-1, +-1)
    np.testing.assert_allclose(graph.edge_dist, 4.12 * math.sqrt(3) / 2, atol=1e-5)


def test_isolated_atom_is_kept_as_a_node_without_edges():
    cell = Structure(Lattice.cubic(12.0), ["O", "O", "Xe"], [[0, 0, 0], [0.1, 0, 0], [0.5, 0.5, 0.5]])
    graph = build_graph(cell, cutoff=5.0)
    assert list(graph.atomic_numbers) == [8, 8, 54]
    assert 2 not in set(graph.edge_src) | set(graph.edge_dst)
    assert sorted(zip(graph.edge_src.tolist(), graph.edge_dst.tolist())) == [(0, 1), (1, 0)]
    assert graph.isolated == 1


def test_overlapping_atoms_are_rejected_with_the_distance():
    cell = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.02, 0, 0]])
    with pytest.raises(StructureRejected, match=r"overlapping atoms: sites \d and \d are 0.080 A apart"):
        build_graph(cell)
    coincident = Structure(Lattice.cubic(4.0), ["Na", "Na"], [[0, 0, 0], [0, 0, 0]])
    with pytest.raises(StructureRejected, match="overlapping"):
        build_graph(coincident)


@pytest.mark.parametrize("seed", [0, 1])
def test_rigid_rotation_rotates_edge_vectors_and_nothing_else(seed):
    original = triclinic()
    rotation = Rotation.random(random_state=seed).as_matrix()
    rotated = Structure(Lattice(original.lattice.matrix @ rotation.T), original.species, original.frac_coords)
    g0, g1 = build_graph(original), build_graph(rotated)
    assert g0.atomic_numbers.tolist() == g1.atomic_numbers.tolist()
    assert g0.num_edges == g1.num_edges > 0
    assert edges(g0) == edges(g1, rotation=rotation)


def test_rotation_that_preserves_the_lattice_gives_the_rotated_graph():
    # a 90-degree turn about z maps a cubic lattice onto itself; the motif inside it turns with it
    lattice = Lattice.cubic(5.0)
    motif = Structure(lattice, ["Li", "Fe", "O"], [[0.02, 0.1, 0.2], [0.5, 0.45, 0.6], [0.3, 0.8, 0.1]])
    turn = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    turned = Structure(lattice, motif.species, motif.cart_coords @ turn.T, coords_are_cartesian=True)
    g0, g1 = build_graph(motif), build_graph(turned)
    assert edges(g0) == edges(g1, rotation=turn)


@pytest.mark.parametrize("max_neighbors", [None, 6])
def test_site_permutation_gives_the_same_edge_set(max_neighbors):
    original = triclinic()
    perm = np.array([2, 0, 3, 1])
    permuted = Structure(original.lattice, [original.species[k] for k in perm], original.frac_coords[perm])
    g0, g1 = build_graph(original, max_neighbors=max_neighbors), build_graph(permuted, max_neighbors=max_neighbors)
    assert g1.atomic_numbers.tolist() == g0.atomic_numbers[perm].tolist()
    assert edges(g0) == edges(g1, perm=perm)


def test_dtypes_are_compact():
    graph = build_graph(fcc_cu(), cutoff=3.0)
    assert graph.atomic_numbers.dtype == np.int16
    assert graph.edge_src.dtype == graph.edge_dst.dtype == np.int32
    assert graph.edge_dist.dtype == graph.edge_vec.dtype == np.float32
    assert graph.edge_vec.shape == (3 * graph.num_edges,)


def test_disordered_structure_is_rejected():
    alloy = Structure(Lattice.cubic(3.6), [{"Cu": 0.5, "Au": 0.5}], [[0, 0, 0]])
    with pytest.raises(StructureRejected, match=r"disordered site 0"):
        build_graph(alloy)
    vacancy = Structure(Lattice.cubic(3.6), ["Na", {"Cl": 0.9}], [[0, 0, 0], [0.5, 0.5, 0.5]])
    with pytest.raises(StructureRejected, match=r"disordered site 1"):
        build_graph(vacancy)
