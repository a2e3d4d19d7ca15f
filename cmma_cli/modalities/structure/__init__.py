"""Crystal structure: a message-passing network over the periodic radius graph (PyTorch Geometric).

``cmma preprocess`` builds each material's graph (:mod:`~cmma_cli.modalities.structure.graphs`: atomic
numbers, directed edges centre -> neighbour, edge distances and cartesian edge vectors, periodic images
included), so no neighbour search runs at training time. Messages flow from the neighbour to the centre
atom. The architecture is chosen by name from :mod:`~cmma_cli.modalities.structure.encoders` (``schnet``
by default, ``cgcnn``, ``painn``). All see only distances (and, for PaiNN, directions combined into
rotation invariants), atom types and graph connectivity, and pool atoms by mean or sum: the material
vector is invariant to rotation, translation and the order of the sites.

Pretrained universal potentials (``chgnet``, ``sevenn``, or a user's adapter class) are structure encoders too
(:mod:`~cmma_cli.modalities.structure.encoders.backbone`): they rebuild each structure from the processed
``atomic_numbers``, ``lattice`` and ``frac_coords`` and use their package's own graphs; frozen (the default),
their material vectors are computed once and cached in the workspace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cmma_cli.errors import CMMAError
from cmma_cli.modalities.base import Context, Item, Modality, Prepared, UserInputs
from cmma_cli.modalities.columns import csr, ragged_index
from cmma_cli.modalities.structure import encoders

POOLINGS = ("mean", "sum")


@dataclass
class StructurePreprocess:
    """How a structure becomes a graph (``cmma preprocess``)."""

    cutoff: float = field(default=5.0, metadata={"flag": "cutoff"})  # radius (Angstrom) of the periodic neighbour graph
    max_neighbors: int | None = field(default=None, metadata={"flag": "max_neighbors"})  # keep at most this many nearest neighbours per atom (ties kept)
    min_distance: float = field(default=0.5, metadata={"flag": "min_distance"})  # atoms closer than this (Angstrom) overlap: the structure is rejected


def _check_tune(tune: str) -> None:
    if tune not in ("frozen", "full") and not (tune.startswith("top:") and tune[4:].isdigit() and int(tune[4:]) > 0):
        raise CMMAError(f"--structure-tune must be frozen, full or top:K (K a positive number of interaction blocks), "
                        f"not {tune!r}.")


def _features() -> tuple[str, ...]:
    return ("layers", "crystal", "energy", "composition")  # backbone.FEATURES, without importing torch


@dataclass
class StructureSettings:
    """The structure encoder (``cmma train``)."""

    encoder: str = field(default_factory=encoders.default, metadata={"check": encoders.check_name})  # chgnet | sevenn (pretrained potentials; chgnet is the default where installed) | schnet | cgcnn | painn (graph networks trained from scratch) | package.module:Class
    hidden: int = 128  # width of the atom features (and of the structure encoder's output)
    layers: int = 3  # message-passing layers
    num_rbf: int = field(default=50, metadata={"flag": "num_rbf"})  # Gaussian radial basis functions of the edge distances
    pooling: str = field(default="mean", metadata={"flag": "pooling", "choices": POOLINGS})  # atoms -> material: mean | sum
    checkpoint: str | None = None  # pretrained potentials: a weights file of the package (None: its own pretrained weights)
    tune: str = field(default="frozen", metadata={"check": _check_tune})  # pretrained potentials: frozen (vectors cached) | full | top:K (fine-tune the top K interaction blocks)
    lr: float = 1e-4  # learning rate of a pretrained potential when it is fine-tuned
    features: list[str] = field(default_factory=lambda: list(_features()), metadata={"choices": _features, "verb": "name some of"})  # pretrained potentials: parts of the material vector


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
    #: the radius graph, then the structure itself (what pretrained potentials rebuild it from)
    columns = ("atomic_numbers", "edge_src", "edge_dst", "edge_dist", "edge_vec", "lattice", "frac_coords")
    graph_columns = columns[:5]
    fields = (
        pa.field("atomic_numbers", pa.list_(pa.int16())),
        pa.field("edge_src", pa.list_(pa.int32())),
        pa.field("edge_dst", pa.list_(pa.int32())),
        pa.field("edge_dist", pa.list_(pa.float32())),
        pa.field("edge_vec", pa.list_(pa.float32())),
        pa.field("lattice", pa.list_(pa.float32())),  # the 3x3 lattice matrix, row-major (Angstrom)
        pa.field("frac_coords", pa.list_(pa.float32())),  # N x 3 fractional coordinates, flattened
    )
    default = True
    train_config = StructureSettings
    preprocess_config = StructurePreprocess
    derived_keys = frozenset({"avg_neighbors", "checkpoint", "parts", "dim"})

    # ------------------------------------------------------------------------------------ preprocess

    def check(self, cfg: StructurePreprocess) -> None:
        if not cfg.cutoff > 0:
            raise CMMAError(f"--cutoff must be a positive distance in Angstrom, not {cfg.cutoff}.")
        if not 0 <= cfg.min_distance < cfg.cutoff:
            raise CMMAError(
                f"--min-distance must be at least 0 and below the cutoff ({cfg.cutoff} A), not {cfg.min_distance}."
            )
        if cfg.max_neighbors is not None and cfg.max_neighbors < 1:
            raise CMMAError(f"--max-neighbors must be at least 1 (or left out), not {cfg.max_neighbors}.")

    def featurize(self, item: Item, cfg: StructurePreprocess) -> dict[str, Any]:
        """The crystal graph; a structure that cannot become one is rejected for every structure-derived view."""
        if item.structure is None:
            return {}
        from cmma_cli.modalities.structure.graphs import StructureRejected, build_graph

        try:
            graph = build_graph(item.structure, cfg.cutoff, cfg.max_neighbors, cfg.min_distance)
        except StructureRejected as exc:
            item.reject("structure", item.material_id, str(exc))
            item.structure = None
            return {}
        structure = item.structure
        return {**{name: getattr(graph, name) for name in self.graph_columns},
                "lattice": np.asarray(structure.lattice.matrix, np.float32).reshape(-1),
                "frac_coords": np.asarray(structure.frac_coords, np.float32).reshape(-1)}

    def tally(self, table: pa.Table) -> dict[str, dict[str, int]]:
        nodes = table.column("atomic_numbers")
        edges = pc.sum(pc.list_value_length(table.column("edge_src"))).as_py() or 0
        isolated = 0
        src, offsets, valid = csr(table.column("edge_src"), np.int64)
        atoms = pc.fill_null(pc.list_value_length(nodes), 0).to_numpy(zero_copy_only=False)
        for row in np.flatnonzero(valid):
            isolated += int(atoms[row] > np.unique(src[offsets[row]:offsets[row + 1]]).shape[0])
        return {"graphs": {"edges": int(edges), "materials_with_isolated_atoms": isolated}}

    def notes(self, counts: dict[str, dict[str, int]]) -> list[str]:
        isolated = counts.get("graphs", {}).get("materials_with_isolated_atoms", 0)
        return [f"{isolated} structures have atoms with no neighbour within the cutoff; they stay as nodes without "
                "edges (raise --cutoff to connect them)."] if isolated else []

    # ----------------------------------------------------------------------------------------- train

    def spec_columns(self) -> tuple[str, ...]:
        return ("atomic_numbers", "edge_src")

    def spec(self, cfg: StructureSettings, table: pa.Table | None, ctx: Context) -> dict[str, Any]:
        cls = encoders.encoder_class(cfg.encoder)
        if hasattr(cls, "make_spec"):  # an encoder that makes its own spec (a pretrained potential)
            return cls.make_spec(cfg.encoder, cfg, ctx)
        if cfg.pooling not in POOLINGS:
            raise CMMAError(f"--pooling must be one of {', '.join(POOLINGS)}, not {cfg.pooling!r}.")
        recorded = ctx.processed_manifest.get("config", {})
        cutoff = float(recorded.get(self.name, {}).get("cutoff", recorded.get("cutoff", 5.0)))
        avg_neighbors = 1.0
        if table is not None:
            atoms = pc.sum(pc.list_value_length(table.column("atomic_numbers"))).as_py() or 0
            edges = pc.sum(pc.list_value_length(table.column("edge_src"))).as_py() or 0
            avg_neighbors = max(1.0, edges / max(atoms, 1))
        return {
            "architecture": cfg.encoder,
            "hidden": cfg.hidden,
            "layers": cfg.layers,
            "num_rbf": cfg.num_rbf,
            "cutoff": cutoff,
            "pooling": cfg.pooling,
            "avg_neighbors": round(float(avg_neighbors), 3),
        }

    def prepare(self, table: pa.Table, spec: dict[str, Any], ctx: Context) -> Prepared:
        cls = encoders.encoder_class(spec["architecture"])
        if hasattr(cls, "prepare"):  # the encoder prepares its own inputs (a pretrained potential)
            data = cls.prepare(table, spec, ctx)
            data.architecture = spec["architecture"]
            return data
        z, node_off, present = csr(table.column("atomic_numbers"), np.int64)
        src, edge_off, _ = csr(table.column("edge_src"), np.int64)
        dst, _, _ = csr(table.column("edge_dst"), np.int64)
        dist, _, _ = csr(table.column("edge_dist"), np.float32)
        vec, _, _ = csr(table.column("edge_vec"), np.float32)
        return StructureData(present, z, node_off, src, dst, dist, vec.reshape(-1, 3), edge_off)

    def collate(self, data: Prepared, rows: np.ndarray, rng: np.random.Generator | None) -> dict:
        """One disjoint union graph: node indices shifted per material, ``batch`` maps atoms to rows (or what
        the encoder's own ``collate`` makes of the rows)."""
        architecture = getattr(data, "architecture", None)
        if architecture is not None:
            cls = encoders.encoder_class(architecture)
            if hasattr(cls, "collate"):
                return cls.collate(data, rows, rng)
        import torch

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

    def encoder(self, spec: dict[str, Any]):
        return encoders.build(spec)

    def learning_rate(self, cfg: StructureSettings) -> float | None:
        """``--structure-lr`` for a pretrained potential that fine-tunes; else the run's learning rate."""
        if cfg is None or cfg.tune == "frozen" or not encoders.is_backbone(cfg.encoder):
            return None
        return cfg.lr

    def ablation_variants(self, cfg: StructureSettings) -> list[tuple[str, dict[str, Any]]]:
        """Every registered architecture whose package is installed: the graph networks from scratch, the
        pretrained potentials frozen, and CHGNet with its top interaction block fine-tuned."""
        from importlib.util import find_spec

        out = []
        for name in encoders.names():
            package = getattr(encoders.encoder_class(name), "package", None)
            if package and find_spec(package) is None:
                continue
            out.append((name, {"encoder": name, "tune": "frozen"}))
            if name == "chgnet":
                out.append(("chgnet top:1", {"encoder": name, "tune": "top:1"}))
        return out

    # ---- embed and retrieve

    query_option = "structure"
    query_help = "Query with a CIF file."
    query_example = "--structure FILE.cif"
    input_help = "CIF files or folders, a table with a CIF column"
    whole_materials = True

    @property
    def input_columns(self) -> tuple[str, tuple[str, ...]]:
        from cmma_cli.sources.local import CIF_COLUMNS

        return ("CIF", CIF_COLUMNS)

    def claim_input(self, path) -> int:
        """``.cif`` files, and tables with a CIF column."""
        from cmma_cli.modalities.user_files import is_table, pick, suffix, table_columns

        if suffix(path) == ".cif":
            return 2
        return 2 if is_table(path) and pick(table_columns(path), self.input_columns[1]) is not None else 0

    def read_inputs(self, paths, cfg) -> UserInputs:
        """CIFs and CIF tables, read exactly as ``cmma fetch --source local`` reads them (ids, properties,
        symmetry): whole materials, featurized by every modality as preprocess featurizes ``raw/``."""
        from pathlib import Path

        from cmma_cli.sources.local import load_local
        from cmma_cli.sources.schema import STRUCTURE_COLUMN

        raw = load_local([str(p) for p in paths])
        frame = raw.materials
        files = {f"local:{Path(p).name}": str(Path(p).resolve()) for p in paths}  # load_local's source names
        materials = []
        for row in frame[[c for c in frame.columns if c not in (STRUCTURE_COLUMN, "elements")]].to_dict("records"):
            source = row.pop("source", None)
            materials.append({**row, "kind": self.name, "file": files.get(source, source)})
        return UserInputs(ids=frame["material_id"].astype(str).tolist(), structures=frame[STRUCTURE_COLUMN].tolist(),
                          materials=materials, rejects=list(raw.rejects))

    def read_query(self, value, cfg) -> UserInputs:
        from pathlib import Path

        from cmma_cli.sources.structures import parse_cif

        path = Path(value)
        try:
            structure = parse_cif(path.read_text(errors="replace"))
        except FileNotFoundError:
            raise CMMAError(f"The CIF file {path} does not exist: check the path given to --{self.query_option}.") from None
        except (OSError, ValueError) as exc:
            raise CMMAError(f"Could not read the CIF {path} ({exc}): pass a valid CIF file.") from None
        return UserInputs(ids=[path.stem], structures=[structure.to_json()])

    def unusable_query(self, value, reason: str) -> str:
        return f"The structure in {value} cannot be used ({reason}): pass another CIF."

    def warm_up(self, encoder) -> None:
        """A frozen pretrained potential: load it once, so a query's time is its encoding alone."""
        module = encoder.model.encoders[self.name] if self.name in encoder.model.encoders else None
        if getattr(module, "frozen", False) and hasattr(module, "loaded"):
            module.loaded(module.spec["backbone"], module.spec.get("checkpoint"))

    # ---- evaluate

    attribution = "atoms"
    explain_anchor = True

    def attribute(self, encoder, head, inputs, other, ctx):
        """Per-atom contributions: each atom's features before pooling (``encoder.atoms``), projected and dotted
        with ``other``. A frozen pretrained potential's batch holds the cached material vector, so its atoms are
        recomputed from the structure in the processed row."""
        from cmma_cli.modalities.base import Attribution
        from cmma_cli.modalities.structure.explain import attribute

        if not hasattr(encoder, "atoms"):
            return Attribution({})
        if "vector" in inputs:
            import torch

            from cmma_cli.modalities.structure.encoders.backbone import read_structures

            z, _, _, lattice, frac = read_structures(ctx.row)
            inputs = {"z": torch.from_numpy(z), "frac": torch.from_numpy(frac),
                      "lattice": torch.from_numpy(lattice.reshape(-1, 3, 3))}
        return attribute(encoder, head, inputs, other, ctx)

    def attribution_text(self, pair: dict[str, Any], markdown: bool = True) -> list[str]:
        if "elements" not in pair:
            return []
        if not markdown:
            return ["  atoms, mean per element: " + ", ".join(f"{e} {v:+.3f}" for e, v in pair["elements"].items())]
        return ["Per-element mean atom contribution (each atom's node embedding, projected into the shared "
                f"space, dotted with the {pair['other']} embedding): "
                + ", ".join(f"{e} {v:+.3f}" for e, v in pair["elements"].items()) + ".", ""]
