"""Pretrained universal interatomic potentials (CHGNet, SevenNet, ...) as structure encoders.

A backbone is the package's own network and its own graph construction, reached through one adapter class,
:class:`BackboneEncoder`: a subclass (one module per package, ``chgnet.py``, ``sevenn.py``) says how to load the
model (:meth:`~BackboneEncoder.load_model`), build one structure's graph (:meth:`~BackboneEncoder.graph`), run a
batch of graphs (:meth:`~BackboneEncoder.run`: per-atom features after each interaction block, the per-atom
features its readout sees, the predicted energy per atom) and list its interaction blocks
(:meth:`~BackboneEncoder.blocks`). Nothing of the networks is re-implemented here.

**The material vector** is the concatenation of the parts ``--structure-features`` names (all by default):

- ``layers``: the mean over atoms of the atom features after every interaction block, block after block;
- ``crystal``: the mean over atoms of the atom features the backbone's energy readout reads;
- ``energy``: the predicted energy per atom (eV/atom);
- ``composition``: the element fractions over atomic numbers 1..94.

All are invariant to the order of the sites, to rotations and translations (the backbones see distances
and, for SevenNet, rotation-invariant scalar channels only).

**Modes** (``--structure-tune``): ``frozen`` (the default) computes each material's backbone parts once and keeps
them in ``<workspace>/cache/structure/<hash of the backbone id>.parquet``, keyed by a hash of the material's
atomic numbers, lattice and fractional coordinates, so training runs at the speed of the projection heads and a
second run recomputes nothing; the backbone is then no part of the model's state (nor of checkpoints). ``full``
fine-tunes the whole backbone and ``top:K`` its top K interaction blocks, at ``--structure-lr``: batches then
carry the structures (atomic numbers, fractional coordinates, lattices) and the encoder builds the package's
graphs in ``forward``.

**Other weights**: ``--structure-checkpoint FILE`` loads the package's model from a file of its own format (a
fine-tuned CHGNet ``.pth.tar``, a SevenNet checkpoint); ``--structure-encoder package.module:Class`` names a
user's own subclass of :class:`BackboneEncoder`.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
import hashlib
import io
import json
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from cmma_cli.errors import CMMAError
from cmma_cli.modalities.base import Context, Prepared
from cmma_cli.modalities.columns import csr, ragged_index
from cmma_cli.workspace import file_digest

#: The parts of a material vector, in vector order (``--structure-features``).
FEATURES = ("layers", "crystal", "energy", "composition")
#: The parts the backbone computes (cached when frozen); ``composition`` comes from the atomic numbers.
BACKBONE_PARTS = ("layers", "crystal", "energy")
#: Element fractions over atomic numbers 1..94.
NUM_COMPOSITION = 94
#: Structures per backbone forward pass when extracting frozen features.
EXTRACT_BATCH = 32
#: Write the frozen cache after this many new materials, so an interrupted extraction keeps what it did.
FLUSH_EVERY = 4096

#: Backbone models loaded in this process for frozen extraction: ``{backbone id: model}``.
_LOADED: dict[str, nn.Module] = {}


def parse_tune(tune: str) -> int | None:
    """``frozen`` -> 0 blocks, ``full`` -> None (all), ``top:K`` -> K; anything else is refused."""
    if tune == "frozen":
        return 0
    if tune == "full":
        return None
    if isinstance(tune, str) and tune.startswith("top:") and tune[4:].isdigit() and int(tune[4:]) > 0:
        return int(tune[4:])
    raise CMMAError(f"--structure-tune must be frozen, full or top:K (K a positive number of interaction blocks), "
                    f"not {tune!r}.")


def check_features(features: list[str]) -> None:
    """Refuse an empty or unknown ``--structure-features``."""
    unknown = [f for f in features if f not in FEATURES]
    if unknown or not features:
        raise CMMAError(f"--structure-features must name some of {', '.join(FEATURES)}, not "
                        f"{','.join(map(str, features)) or 'nothing'}.")


def require(package: str, pip_name: str | None = None, label: str | None = None):
    """``import package``, or one sentence naming what to install."""
    try:
        return import_module(package)
    except ImportError:
        raise CMMAError(f"The {label or package} structure encoder needs the Python package {pip_name or package}, "
                        f"which is not installed: pip install {pip_name or package}.") from None


def resolve_checkpoint(path: str | None) -> str | None:
    """``--structure-checkpoint`` as an absolute path (None: the package's own weights), or one sentence."""
    if path is None or str(path) == "":
        return None
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise CMMAError(f"The backbone checkpoint {path} given to --structure-checkpoint does not exist: pass a "
                        "weights file of the backbone's package, or leave it out for its pretrained weights.")
    return str(file.resolve())


def material_key(numbers: np.ndarray, lattice: np.ndarray, frac: np.ndarray) -> str:
    """The frozen cache key of one structure: a hash of its atomic numbers, lattice and fractional coordinates."""
    digest = hashlib.sha256(np.ascontiguousarray(numbers, np.int16).tobytes())
    digest.update(np.ascontiguousarray(lattice, np.float32).tobytes())
    digest.update(np.ascontiguousarray(frac, np.float32).tobytes())
    return digest.hexdigest()[:24]


def composition(z: torch.Tensor, owners: torch.Tensor, rows: int) -> torch.Tensor:
    """``(rows, 94)`` element fractions of each material (atoms with Z above 94 count in no column)."""
    z = z.long()
    keep = (z >= 1) & (z <= NUM_COMPOSITION)
    out = torch.zeros(rows * NUM_COMPOSITION, dtype=torch.float32, device=z.device)
    out.index_add_(0, owners[keep] * NUM_COMPOSITION + z[keep] - 1,
                   torch.ones(int(keep.sum()), dtype=torch.float32, device=z.device))
    counts = torch.bincount(owners, minlength=rows).clamp_min(1).to(torch.float32)
    return out.view(rows, NUM_COMPOSITION) / counts[:, None]


def mean_over_atoms(x: torch.Tensor, owners: torch.Tensor, rows: int) -> torch.Tensor:
    """``(rows, d)`` the mean of per-atom ``x`` over each material's atoms."""
    total = x.new_zeros(rows, x.shape[1]).index_add_(0, owners, x)
    return total / torch.bincount(owners, minlength=rows).clamp_min(1).to(x.dtype)[:, None]


def make_structure(numbers: np.ndarray, lattice: np.ndarray, frac: np.ndarray):
    """A pymatgen ``Structure`` from processed columns (numbers, the 3x3 lattice, N x 3 fractional coordinates)."""
    from pymatgen.core import Lattice, Structure

    return Structure(Lattice(np.asarray(lattice, np.float64).reshape(3, 3)), [int(n) for n in numbers],
                     np.asarray(frac, np.float64).reshape(-1, 3), coords_are_cartesian=False)


@dataclass
class BackboneOutput:
    """What :meth:`BackboneEncoder.run` returns for a batch of graphs (``B`` materials, ``A`` atoms in all)."""

    layers: list[torch.Tensor]  # per interaction block, (A, width) atom features after it
    crystal: torch.Tensor  # (A, width) the atom features the energy readout reads
    energy: torch.Tensor  # (B,) predicted energy per atom (eV/atom)
    owners: torch.Tensor  # (A,) int64, which material each atom belongs to


@dataclass
class BackboneData(Prepared):
    """Frozen: every row's material vector. Tuned: the structures, as flat arrays with offsets."""

    present: np.ndarray
    vectors: np.ndarray | None  # (rows, dim) float32 when frozen
    z: np.ndarray | None = None  # (total atoms,) int64
    node_offsets: np.ndarray | None = None  # (rows + 1,)
    lattice: np.ndarray | None = None  # (rows, 9) float32
    frac: np.ndarray | None = None  # (total atoms, 3) float32


def read_structures(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(z, node offsets, present, lattices (rows, 9), fractional coordinates (atoms, 3))`` of ``table``."""
    missing = [c for c in ("atomic_numbers", "lattice", "frac_coords") if c not in table.column_names]
    if missing:
        raise CMMAError(f"The processed data has no {', '.join(missing)} column, which backbone structure encoders "
                        "read (it was made by an older cmma): run `cmma preprocess --force`.")
    z, offsets, present = csr(table.column("atomic_numbers"), np.int64)
    lat, lat_off, lat_valid = csr(table.column("lattice"), np.float32)
    frac, _, frac_valid = csr(table.column("frac_coords"), np.float32)
    present = present & lat_valid & frac_valid & (np.diff(offsets) > 0)
    lattice = np.zeros((table.num_rows, 9), np.float32)
    full = lat_valid & (np.diff(lat_off) == 9)
    if full.any():
        lattice[full] = lat[ragged_index(lat_off, np.flatnonzero(full))[0]].reshape(-1, 9)
    return z, offsets, present & full, lattice, frac.reshape(-1, 3)


class BackboneEncoder(nn.Module, ABC):
    """A pretrained universal potential as the structure encoder; subclass it for a package (or for other weights).

    Class attributes: ``package`` (its import name), ``pip_name`` (what ``pip install`` takes), ``label`` (its name
    in sentences), ``weights`` (the packaged weights loaded without ``--structure-checkpoint``). Adapter methods to
    implement: :meth:`load_model`, :meth:`graph`, :meth:`run`, :meth:`blocks`.
    """

    package: str = ""
    pip_name: str = ""
    label: str = ""
    weights: str = ""

    # ------------------------------------------------------------------------------------ the adapter

    @classmethod
    @abstractmethod
    def load_model(cls, checkpoint: str | None) -> nn.Module:
        """The package's model (on the CPU): its packaged ``weights``, or those of ``checkpoint`` (a file)."""

    @classmethod
    @abstractmethod
    def graph(cls, model: nn.Module, structure) -> Any:
        """One structure's graph, built by the package (on the CPU); raise to refuse the structure."""

    @classmethod
    @abstractmethod
    def run(cls, model: nn.Module, graphs: list[Any]) -> BackboneOutput:
        """Run the model on a batch of graphs (on the model's device), without forces."""

    @classmethod
    @abstractmethod
    def blocks(cls, model: nn.Module) -> list[list[nn.Module]]:
        """The interaction blocks, input side first (``top:K`` trains the last K)."""

    @classmethod
    def supports(cls, model: nn.Module | None, numbers: np.ndarray) -> bool:
        """Whether the backbone knows every element of a structure (``model`` None: judged without it)."""
        return bool(numbers.size) and int(numbers.min()) >= 1 and int(numbers.max()) <= NUM_COMPOSITION

    # ------------------------------------------------------------------------------ identity and spec

    @classmethod
    def identity(cls, checkpoint: str | None) -> str:
        """The backbone id: package, its version and the weights (their file's digest for a checkpoint)."""
        require(cls.package, cls.pip_name, cls.label)
        try:
            release = version(cls.pip_name or cls.package)
        except PackageNotFoundError:
            release = "?"
        weights = f"sha256:{file_digest(checkpoint)}" if checkpoint else cls.weights
        return f"{cls.__module__}:{cls.__qualname__} {cls.package}=={release} {weights}"

    @classmethod
    def make_spec(cls, architecture: str, cfg: Any, ctx: Context) -> dict[str, Any]:
        """The encoder spec of ``--structure-encoder architecture`` with the structure settings ``cfg``."""
        parse_tune(cfg.tune)
        features = [f for f in FEATURES if f in cfg.features]
        check_features(list(cfg.features))
        checkpoint = resolve_checkpoint(cfg.checkpoint)
        backbone = cls.identity(checkpoint)
        parts = cls.part_dims(backbone, checkpoint, ctx)
        return {
            "architecture": architecture,
            "backbone": backbone,
            "checkpoint": checkpoint,
            "tune": cfg.tune,
            "features": features,
            "parts": parts,
            "dim": int(sum(parts[f] for f in features)),
        }

    @classmethod
    def part_dims(cls, backbone: str, checkpoint: str | None, ctx: Context) -> dict[str, int]:
        """``{part: width}`` of the material vector's parts, measured once on a small structure (and remembered
        beside the frozen cache, so a later run need not load the backbone)."""
        memo = cache_path(backbone, ctx, ".json")
        if memo is not None and memo.exists():
            try:
                return {k: int(v) for k, v in json.loads(memo.read_text())["parts"].items()}
            except (ValueError, KeyError, TypeError):
                pass
        from pymatgen.core import Lattice, Structure

        probe = Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
        with torch.no_grad():
            parts = cls.extract(cls.loaded(backbone, checkpoint), [probe])
        dims = {**{p: int(parts[p].shape[1]) for p in BACKBONE_PARTS}, "composition": NUM_COMPOSITION}
        if memo is not None:
            from cmma_cli.workspace import write_json

            write_json({"backbone": backbone, "parts": dims}, memo)
        return dims

    @classmethod
    def loaded(cls, backbone: str, checkpoint: str | None) -> nn.Module:
        """The backbone for frozen extraction: loaded once per process, eval mode, no gradients."""
        model = _LOADED.get(backbone)
        if model is None:
            model = cls.quietly_load(checkpoint)
            model.requires_grad_(False).eval().to("cuda" if torch.cuda.is_available() else "cpu")
            _LOADED.clear()  # one frozen backbone in memory at a time
            _LOADED[backbone] = model
        return model

    @classmethod
    def quietly_load(cls, checkpoint: str | None) -> nn.Module:
        """:meth:`load_model` without the package's banners on stdout, every failure one sentence."""
        require(cls.package, cls.pip_name, cls.label)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                return cls.load_model(checkpoint)
        except CMMAError:
            raise
        except Exception as exc:
            what = f"the checkpoint {checkpoint}" if checkpoint else f"its pretrained weights {cls.weights}"
            reason = (str(exc).strip().splitlines() or [""])[0]
            raise CMMAError(f"The {cls.label or cls.package} structure encoder could not load {what} "
                            f"({type(exc).__name__}: {reason}): pass --structure-checkpoint a weights file of the "
                            f"{cls.package} package.") from None

    # ---------------------------------------------------------------------------------- the vector

    @classmethod
    def extract(cls, model: nn.Module, structures: list | None = None, graphs: list | None = None
                ) -> dict[str, torch.Tensor]:
        """``{part: (materials, width)}`` backbone parts of the material vectors of ``structures`` (or of their
        already built ``graphs``), gradients as enabled."""
        if graphs is None:
            graphs = [cls.graph(model, s) for s in structures]
        out = cls.run(model, graphs)
        rows = len(graphs)
        return {
            "layers": torch.cat([mean_over_atoms(h.float(), out.owners, rows) for h in out.layers], dim=1),
            "crystal": mean_over_atoms(out.crystal.float(), out.owners, rows),
            "energy": out.energy.float().reshape(rows, 1),
        }

    @staticmethod
    def assemble(parts: dict[str, torch.Tensor], features: list[str], z: torch.Tensor, owners: torch.Tensor,
                 rows: int) -> torch.Tensor:
        """The material vectors ``(rows, dim)``: the parts ``features`` names, in :data:`FEATURES` order."""
        out = []
        for f in FEATURES:
            if f in features:
                out.append(composition(z, owners, rows) if f == "composition" else parts[f])
        return torch.cat([o.to(out[0].device) for o in out], dim=1)

    # ----------------------------------------------------------------------- data (prepare, collate)

    @classmethod
    def prepare(cls, table: pa.Table, spec: dict[str, Any], ctx: Context) -> BackboneData:
        z, offsets, present, lattice, frac = read_structures(table)
        if parse_tune(spec["tune"]) != 0:
            for row in np.flatnonzero(present):
                present[row] = cls.supports(None, z[offsets[row]:offsets[row + 1]])
            return BackboneData(present, None, z, offsets, lattice, frac)
        vectors = np.zeros((table.num_rows, int(spec["dim"])), np.float32)
        rows = np.flatnonzero(present)
        parts, ok = cached_parts(cls, spec, ctx, z, offsets, lattice, frac, rows)
        rows = rows[ok]
        present[:] = False
        present[rows] = True
        if len(rows):
            nodes, counts = ragged_index(offsets, rows)
            owners = torch.from_numpy(np.repeat(np.arange(len(rows)), counts))
            found = {p: torch.from_numpy(parts[p][ok]) for p in BACKBONE_PARTS}
            vectors[rows] = cls.assemble(found, spec["features"], torch.from_numpy(z[nodes]), owners,
                                         len(rows)).numpy()
        return BackboneData(present, vectors)

    @staticmethod
    def collate(data: BackboneData, rows: np.ndarray, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        if data.vectors is not None:
            return {"vector": torch.from_numpy(data.vectors[rows])}
        nodes, counts = ragged_index(data.node_offsets, rows)
        return {
            "z": torch.from_numpy(data.z[nodes]),
            "frac": torch.from_numpy(data.frac[nodes]),
            "lattice": torch.from_numpy(data.lattice[rows].reshape(-1, 3, 3)),
            "num_nodes": torch.from_numpy(counts),
        }

    # ------------------------------------------------------------------------------------ the module

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        self.spec = dict(spec)
        self.out_dim = int(spec["dim"])
        self.features = list(spec["features"])
        tune = parse_tune(spec["tune"])
        self.frozen = tune == 0
        if self.frozen:
            return  # cached vectors pass through; the backbone is no submodule: never trained or saved
        self.backbone = self.quietly_load(spec.get("checkpoint"))
        if tune is not None:
            blocks = self.blocks(self.backbone)
            if tune > len(blocks):
                raise CMMAError(f"--structure-tune top:{tune} asks for more blocks than the "
                                f"{self.label or self.package} backbone has ({len(blocks)}): pass top:K with K at most "
                                f"{len(blocks)}, or full.")
            self.backbone.requires_grad_(False)
            for block in blocks[-tune:]:
                for module in block:
                    module.requires_grad_(True)

    def atoms(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-atom vectors ``(atoms, dim)`` of ONE material whose mean over its atoms is its material vector
        (each atom's features after every block and before the readout, the energy per atom, the atom's element
        as a one-hot composition): what per-atom attributions project. ``inputs``: the structure (``z``,
        ``frac``, ``lattice``)."""
        model = self.backbone if not self.frozen else self.loaded(self.spec["backbone"], self.spec.get("checkpoint"))
        z = inputs["z"]
        structure = make_structure(z.cpu().numpy(), inputs["lattice"].cpu().numpy()[0], inputs["frac"].cpu().numpy())
        with torch.no_grad():
            out = self.run(model, [self.graph(model, structure)])
        atoms = z.shape[0]
        parts = {"layers": torch.cat([h.float() for h in out.layers], dim=1), "crystal": out.crystal.float(),
                 "energy": out.energy.float().reshape(1, 1).expand(atoms, 1)}
        return self.assemble(parts, self.features, z, torch.arange(atoms, device=z.device), atoms)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if "vector" in inputs:
            return inputs["vector"]
        counts = inputs["num_nodes"].cpu().numpy()
        z, frac, lattice = inputs["z"].cpu().numpy(), inputs["frac"].cpu().numpy(), inputs["lattice"].cpu().numpy()
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        device = inputs["z"].device
        if self.frozen:
            model = self.loaded(self.spec["backbone"], self.spec.get("checkpoint")).to(device)
        else:
            model = self.backbone
        graphs, built = [], []
        for i, (s, n) in enumerate(zip(starts, counts)):
            try:
                graphs.append(self.graph(model, make_structure(z[s:s + n], lattice[i], frac[s:s + n])))
                built.append(i)
            except Exception:  # a structure the package refuses (an isolated atom): its backbone parts stay zero
                continue
        rows = len(counts)
        parts = {p: torch.zeros(rows, int(self.spec["parts"][p]), device=device) for p in BACKBONE_PARTS}
        if graphs:
            with torch.no_grad() if self.frozen else contextlib.nullcontext():
                found = self.extract(model, graphs=graphs)
            index = torch.tensor(built, device=device)
            parts = {p: parts[p].index_copy(0, index, found[p].to(device)) for p in BACKBONE_PARTS}
        owners = torch.repeat_interleave(torch.arange(rows, device=device), inputs["num_nodes"].to(device))
        return self.assemble(parts, self.features, inputs["z"], owners, rows)


# ------------------------------------------------------------------------------------- the cache


def cache_path(backbone: str, ctx: Context, suffix: str = ".parquet") -> Path | None:
    """``<workspace>/cache/structure/<hash of the backbone id><suffix>`` (None without a workspace cache)."""
    if ctx.cache_dir is None:
        return None
    return Path(ctx.cache_dir) / "structure" / f"{hashlib.sha256(backbone.encode()).hexdigest()[:16]}{suffix}"


#: The last frozen cache file read in this process: ``(path, size, mtime) -> its contents``.
_READ: dict[tuple[str, int, int], dict[str, np.ndarray]] = {}


def _read_cache(path: Path | None) -> dict[str, np.ndarray]:
    """``{"key": keys, part: (n, width)}`` of a frozen cache file, ``{}`` when there is none (the last file read
    is kept in memory while unchanged: ``cmma embed`` prepares the processed rows chunk by chunk)."""
    import pyarrow.parquet as pq

    if path is None or not path.exists():
        return {}
    stat = path.stat()
    memo = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo in _READ:
        return _READ[memo]
    table = pq.read_table(path)
    out: dict[str, Any] = {"key": np.asarray(table.column("key").to_pylist(), dtype=object)}
    for p in BACKBONE_PARTS:
        flat, offsets, _ = csr(table.column(p), np.float32)
        width = int(offsets[1] - offsets[0]) if table.num_rows else 0
        out[p] = flat.reshape(table.num_rows, width)
    _READ.clear()
    _READ[memo] = out
    return out


def _write_cache(path: Path, keys: list[str], parts: dict[str, list[np.ndarray]]) -> None:
    from cmma_cli.modalities.columns import list_array
    from cmma_cli.workspace import write_arrow

    write_arrow(pa.table({"key": pa.array(keys, pa.string()),
                          **{p: list_array(list(parts[p]), pa.float32()) for p in BACKBONE_PARTS}}), path)


@contextlib.contextmanager
def _restore_threads(threads: int):
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cached_parts(cls: type[BackboneEncoder], spec: dict[str, Any], ctx: Context, z: np.ndarray, offsets: np.ndarray,
                 lattice: np.ndarray, frac: np.ndarray, rows: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The frozen backbone parts of ``rows`` (``{part: (len(rows), width)}``) and which rows have them (a structure
    the backbone refuses has none), computing only the materials missing from the workspace cache."""
    path = cache_path(spec["backbone"], ctx)
    cached = _read_cache(path)
    index = {k: i for i, k in enumerate(cached.get("key", []))}
    keys = [material_key(z[offsets[r]:offsets[r + 1]], lattice[r], frac[offsets[r]:offsets[r + 1]]) for r in rows]
    new: dict[str, dict[str, np.ndarray]] = {}
    missing = list(dict.fromkeys(k for k in keys if k not in index))
    refused: set[str] = set()
    if missing:
        first = {}
        for r, k in zip(rows, keys):
            first.setdefault(k, r)
        model = cls.loaded(spec["backbone"], spec.get("checkpoint"))
        from cmma_cli.console import console, progress

        known = {k: {p: cached[p][i] for p in BACKBONE_PARTS} for k, i in index.items()}

        def flush() -> None:
            if path is not None:
                every = {**known, **new}
                _write_cache(path, list(every), {p: [v[p] for v in every.values()] for p in BACKBONE_PARTS})

        threads = torch.get_num_threads()
        if next(model.parameters()).device.type == "cpu":
            # one intra-op thread: the backbones' many small operations gain little from more, and lose up to
            # 10x when another process shares the cores (measured with CHGNet on 2 cores: 9 vs 90 structures/s)
            torch.set_num_threads(1)
        with progress() as bar, _restore_threads(threads):
            task = bar.add_task(f"Backbone features ({cls.label or cls.package}, frozen, cached)", total=len(missing),
                                visible=ctx.show_progress)
            since = 0
            for start in range(0, len(missing), EXTRACT_BATCH):
                chunk = missing[start:start + EXTRACT_BATCH]
                graphs, usable = [], []
                for k in chunk:
                    r = first[k]
                    numbers = z[offsets[r]:offsets[r + 1]]
                    if not cls.supports(model, numbers):
                        refused.add(k)
                        continue
                    try:
                        structure = make_structure(numbers, lattice[r], frac[offsets[r]:offsets[r + 1]])
                        graphs.append(cls.graph(model, structure))
                        usable.append(k)
                    except Exception:  # a structure the package refuses: no vector
                        refused.add(k)
                if graphs:
                    with torch.no_grad():
                        parts = cls.extract(model, graphs=graphs)
                    for i, k in enumerate(usable):
                        new[k] = {p: parts[p][i].cpu().numpy().astype(np.float32) for p in BACKBONE_PARTS}
                since += len(chunk)
                bar.advance(task, len(chunk))
                if since >= FLUSH_EVERY:
                    flush()
                    since = 0
        flush()
        if refused:
            console.print(f"The {cls.label or cls.package} backbone could not use {len(refused)} structure(s) "
                          "(elements it does not know, or a graph its package refuses): they have no structure "
                          "vector in this run.")
    ok = np.array([k not in refused for k in keys], dtype=bool)
    out = {}
    for p in BACKBONE_PARTS:
        width = int(spec["parts"][p])
        vals = np.zeros((len(keys), width), np.float32)
        for i, k in enumerate(keys):
            if k in index:
                vals[i] = cached[p][index[k]]
            elif k in new:
                vals[i] = new[k][p]
        out[p] = vals
    return out, ok
