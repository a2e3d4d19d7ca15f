"""A trained run's encoders, loaded once, turning processed rows or new inputs into shared-space vectors.

Used by ``cmma embed`` (every processed material, and the user's ``--input`` files) and by
``cmma retrieve`` (one query). New inputs go through exactly the code that made the training data:
a structure through :func:`cmma_cli.preprocess.featurize.featurize` (the crystal graph and, when the
run has the xrd modality, the computed pattern) with the options recorded in the processed manifest;
a measured pattern through :func:`~cmma_cli.preprocess.spectra.measured_pattern` on the same 2-theta
grid; a text through :func:`~cmma_cli.preprocess.text.normalize_text`. Then the modality's own
``prepare`` / ``collate`` and the model's ``embed``, so a material embedded here gets the vector it
would get in ``processed/``.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch

from cmma_cli.console import progress
from cmma_cli.errors import CMMAError
from cmma_cli.modalities import get_modality
from cmma_cli.modalities.base import Context
from cmma_cli.modalities.batches import BatchDataset, MaterialSet, ordered_batches, to_device
from cmma_cli.model import load_model
from cmma_cli.preprocess.featurize import FeaturizeOptions, featurize
from cmma_cli.preprocess.inputs import image_problem
from cmma_cli.preprocess.spectra import PatternRejected, XRDGrid, measured_pattern
from cmma_cli.preprocess.text import normalize_text

#: Processed columns of the structure-derived modalities, with their Arrow value types.
GRAPH_TYPES = {"atomic_numbers": pa.int16(), "edge_src": pa.int32(), "edge_dst": pa.int32(),
               "edge_dist": pa.float32(), "edge_vec": pa.float32()}


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; or the device named."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CMMAError(f"--device {device} asks for a GPU, but torch sees none here: pass --device cpu or auto.")
    try:
        return torch.device(device)
    except RuntimeError:
        raise CMMAError(f"--device must be auto, cpu or cuda[:N], not {device!r}.") from None


def xrd_grid(processed_manifest: dict[str, Any]) -> XRDGrid:
    """The 2-theta grid the processed patterns (and so the XRD encoder) use."""
    recorded = processed_manifest.get("xrd_grid") or {}
    names = {f.name for f in fields(XRDGrid)}
    return XRDGrid(**{k: v for k, v in recorded.items() if k in names})


def featurize_options(processed_manifest: dict[str, Any], xrd: bool) -> FeaturizeOptions:
    """The graph / XRD options ``cmma preprocess`` used, for featurizing new structures the same way.

    No site cap: a user's own structure is embedded whatever its size.
    """
    config = processed_manifest.get("config", {})
    defaults = FeaturizeOptions()
    return FeaturizeOptions(
        cutoff=float(config.get("cutoff", defaults.cutoff)),
        max_neighbors=config.get("max_neighbors"),
        min_distance=float(config.get("min_distance", defaults.min_distance)),
        max_sites=None,
        xrd=xrd,
        grid=xrd_grid(processed_manifest),
    )


@dataclass
class NewInputs:
    """New materials as processed-like columns (one row each), and what could not be used."""

    table: pa.Table
    rejects: list[dict[str, str]] = field(default_factory=list)


def _list_column(values: list[np.ndarray | None], value_type: pa.DataType) -> pa.Array:
    return pa.array(values, type=pa.list_(value_type))


def structure_inputs(items: list[tuple[str, str, str | None]], options: FeaturizeOptions,
                     show_progress: bool = True) -> NewInputs:
    """``(id, structure JSON, measured pattern path or None)`` items -> graph and XRD columns.

    A structure that cannot become a graph is a reject (with preprocess's reason); a measured pattern
    given for an id replaces the computed one, as in ``cmma preprocess --xrd-dir``.
    """
    from pymatgen.analysis.diffraction.xrd import XRDCalculator

    calculator = XRDCalculator(wavelength=options.grid.wavelength) if options.xrd else None
    results = []
    show = show_progress and len(items) > 1
    with warnings.catch_warnings(), (progress() if show else nullcontext()) as bar:
        warnings.simplefilter("ignore")
        task = bar.add_task("Graphs + XRD of new structures", total=len(items)) if show else None
        for mid, text, measured in items:
            results.append(featurize(mid, text, measured, options, calculator))
            if show:
                bar.advance(task)
    kept = [r for r in results if r.graph is not None]
    rejects = [{"source": s, "item": i, "reason": why} for r in results for s, i, why in r.rejects]
    columns: dict[str, Any] = {"material_id": pa.array([r.material_id for r in kept], type=pa.string())}
    for name, value_type in GRAPH_TYPES.items():
        columns[name] = _list_column([getattr(r.graph, name) for r in kept], value_type)
    columns["xrd"] = _list_column([r.xrd for r in kept], pa.float32())
    columns["xrd_source"] = pa.array([r.xrd_source for r in kept], type=pa.string())
    return NewInputs(pa.table(columns), rejects)


def pattern_inputs(items: list[tuple[str, Path]], grid: XRDGrid) -> NewInputs:
    """``(id, pattern file)`` items -> an ``xrd`` column on ``grid``; unreadable files are rejects."""
    ids, patterns, rejects = [], [], []
    for mid, path in items:
        try:
            patterns.append(measured_pattern(Path(path), grid))
            ids.append(mid)
        except (PatternRejected, OSError, UnicodeError) as exc:
            rejects.append({"source": "measured_xrd", "item": str(path), "reason": str(exc)})
    table = pa.table({"material_id": pa.array(ids, type=pa.string()), "xrd": _list_column(patterns, pa.float32())})
    return NewInputs(table, rejects)


def image_inputs(items: list[tuple[str, Path]]) -> NewInputs:
    """``(id, image file)`` items -> an ``image_path`` column; files that do not open are rejects."""
    ids, paths, rejects = [], [], []
    for mid, path in items:
        problem = image_problem(Path(path)) if Path(path).is_file() else "no such file"
        if problem:
            rejects.append({"source": "image", "item": str(path), "reason": problem})
        else:
            ids.append(mid)
            paths.append(str(Path(path).resolve()))
    table = pa.table({"material_id": pa.array(ids, type=pa.string()), "image_path": pa.array(paths, type=pa.string())})
    return NewInputs(table, rejects)


class Encoder:
    """The model of one checkpoint, on one device, with the processed manifest its inputs must match.

    ``cache_dir`` is the workspace cache: with a frozen text model, text vectors come from (and go to)
    the cache that training filled, so ``cmma embed`` recomputes nothing.
    """

    def __init__(self, checkpoint: Path, processed_manifest: dict[str, Any], cache_dir: Path | None = None,
                 device: str = "auto", batch_size: int = 256, workers: int | None = None, show_progress: bool = True):
        if batch_size < 1:
            raise CMMAError(f"--batch-size must be at least 1, not {batch_size}.")
        self.device = pick_device(device)
        self.model, self.checkpoint = load_model(checkpoint, self.device)
        self.spec: dict[str, Any] = self.checkpoint["spec"]
        self.modalities: list[str] = list(self.spec["modalities"])
        self.dim = int(self.spec["embed_dim"])
        self.processed_manifest = processed_manifest
        self.ctx = Context(processed_manifest, cache_dir=cache_dir, show_progress=show_progress)
        self.batch_size = batch_size
        self.workers = workers if workers is not None else (4 if self.device.type == "cuda" else 0)
        self.show_progress = show_progress

    def require(self, modality: str, run: str) -> None:
        """One sentence when the run has no encoder for ``modality``."""
        if modality not in self.modalities:
            raise CMMAError(
                f"Run {run!r} was not trained with the {modality} modality (it has {', '.join(self.modalities)}): "
                f"query from one of those, or train a run that includes {modality} (cmma train --modalities ...)."
            )

    @torch.no_grad()
    def embed_table(self, modality: str, table: pa.Table,
                    advance: Callable[[int], Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, vectors)``: the rows of ``table`` that have ``modality`` and their L2-normalised embeddings.

        ``advance(n)`` is called after each batch of ``n`` rows (a progress bar's); without it the
        method shows its own bar when there is more than one batch.
        """
        materials = MaterialSet(table, {modality: self.spec["encoders"][modality]}, self.ctx)
        rows = np.flatnonzero(materials.present(modality))
        vectors = np.zeros((len(rows), self.dim), dtype=np.float32)
        if len(rows) == 0:
            return rows, vectors
        keys = ordered_batches(rows, self.batch_size)
        workers = self.workers if len(keys) > 1 else 0
        loader = torch.utils.data.DataLoader(BatchDataset(materials), batch_size=None, sampler=keys,
                                             num_workers=workers, pin_memory=self.device.type == "cuda")
        done = 0
        show = advance is None and self.show_progress and len(keys) > 1
        with (progress() if show else nullcontext()) as bar:
            if show:
                task = bar.add_task(f"Embedding {modality}", total=len(rows))
                advance = lambda n: bar.advance(task, n)  # noqa: E731
            advance = advance or (lambda n: None)
            for batch in loader:
                z = self.model.embed(modality, to_device(batch["inputs"][modality], self.device))
                vectors[done : done + z.shape[0]] = z.float().cpu().numpy()
                done += z.shape[0]
                advance(z.shape[0])
        return rows, vectors

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """L2-normalised text embeddings ``(len(texts), d)`` of already clean ``texts``."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        encoder = self.model.encoders["text"]
        if encoder.frozen and self.ctx.cache_dir is not None:
            from cmma_cli.modalities.text import cached_embeddings

            raw = torch.from_numpy(cached_embeddings(texts, self.spec["encoders"]["text"], self.ctx))
        else:  # a query, or a fine-tuned text model: the run's own sentence model
            raw = encoder.encode(texts)
        out = [self.model.embed("text", {"embedding": raw[i : i + self.batch_size].to(self.device)}).float().cpu()
               for i in range(0, len(texts), self.batch_size)]
        return torch.cat(out).numpy()

    def embed_query_text(self, text: str) -> np.ndarray:
        """The ``(d,)`` embedding of a free-text query, cleaned as descriptions are."""
        clean = normalize_text(text)
        if not clean:
            raise CMMAError("The query text is empty: give a synthesis procedure or a description in quotes.")
        return self.embed_texts([clean])[0]

    def embed_structure_file(self, path: Path, want: tuple[str, ...] = ("structure", "xrd")) -> dict[str, np.ndarray]:
        """``{modality: (d,)}`` of one CIF: its structure and its computed XRD pattern (those of ``want`` the run has)."""
        from cmma_cli.sources.structures import parse_cif

        path = Path(path)
        try:
            structure = parse_cif(path.read_text(errors="replace"))
        except FileNotFoundError:
            raise CMMAError(f"The CIF file {path} does not exist: check the path given to --structure.") from None
        except (OSError, ValueError) as exc:
            raise CMMAError(f"Could not read the CIF {path} ({exc}): pass a valid CIF file.") from None
        options = featurize_options(self.processed_manifest, xrd="xrd" in want and "xrd" in self.modalities)
        new = structure_inputs([(path.stem, structure.to_json(), None)], options, show_progress=False)
        if new.table.num_rows == 0:
            raise CMMAError(f"The structure in {path} cannot be used ({new.rejects[0]['reason']}): pass another CIF.")
        return {m: vec[0] for m, (ids, vec) in self.embed_new(new.table).items() if m in want and ids}

    def embed_pattern_file(self, path: Path) -> np.ndarray:
        """The ``(d,)`` embedding of a measured XRD pattern file (two columns: 2-theta, intensity)."""
        path = Path(path)
        if not path.is_file():
            raise CMMAError(f"The pattern file {path} does not exist: check the path given to --pattern.")
        new = pattern_inputs([(path.stem, path)], xrd_grid(self.processed_manifest))
        if new.table.num_rows == 0:
            raise CMMAError(f"Could not read the XRD pattern {path} ({new.rejects[0]['reason']}): give a text file "
                            "with two numeric columns, 2-theta and intensity.")
        return self.embed_table("xrd", new.table)[1][0]

    def embed_image_file(self, path: Path) -> np.ndarray:
        """The ``(d,)`` embedding of one image file."""
        new = image_inputs([(Path(path).stem, Path(path))])
        if new.table.num_rows == 0:
            raise CMMAError(f"Could not open the image {path} ({new.rejects[0]['reason']}): pass a PNG, JPEG or TIFF file.")
        return self.embed_table("image", new.table)[1][0]

    def embed_new(self, table: pa.Table) -> dict[str, tuple[list[str], np.ndarray]]:
        """``{modality: (ids, vectors)}`` for every trained modality ``table`` has a column for."""
        ids = [str(m) for m in table.column("material_id").to_pylist()]
        out = {}
        for m in self.modalities:
            if m == "text" or not all(c in table.column_names for c in get_modality(m).columns):
                continue
            rows, vectors = self.embed_table(m, table)
            out[m] = ([ids[r] for r in rows], vectors)
        return out

