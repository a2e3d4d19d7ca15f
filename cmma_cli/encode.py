"""A trained run's encoders, loaded once, turning processed rows or new inputs into shared-space vectors.

Used by ``cmma embed`` (every processed material, and the user's ``--input`` files) and by
``cmma retrieve`` (one query). New inputs go through exactly the code that made the training data: each
modality reads its user files into processed-like columns (:meth:`~cmma_cli.modalities.base.Modality.read_inputs`,
:meth:`~cmma_cli.modalities.base.Modality.read_query`, with its preprocess settings as recorded in the
processed manifest); whole materials (a CIF) go through :func:`cmma_cli.preprocess.featurize.featurize`
with that same preprocess config, so every modality computes its columns from them as ``cmma preprocess``
does (the crystal graph and, when the run has the xrd modality, the computed pattern, or the measured one
named like the CIF). Then the modality's own ``prepare`` / ``collate`` and the model's ``embed``, so a
material embedded here gets the vector it would get in ``processed/``.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch

from cmma_cli.console import progress
from cmma_cli.errors import CMMAError
from cmma_cli.modalities import REGISTRY, get_modality
from cmma_cli.modalities.base import Context, Modality, UserInputs
from cmma_cli.modalities.batches import BatchDataset, MaterialSet, ordered_batches, to_device
from cmma_cli.model import add_modalities, load_model


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


def preprocess_config(processed_manifest: dict[str, Any]):
    """The :class:`~cmma_cli.config.PreprocessConfig` ``processed/`` was made with, for featurizing new materials
    the same way. No site cap: a user's own structure is embedded whatever its size."""
    from cmma_cli.config import PreprocessConfig, from_dict

    cfg = from_dict(PreprocessConfig, processed_manifest.get("config", {}))
    cfg.max_sites = None
    return cfg


def _has_values(table: pa.Table, modality: Modality) -> bool:
    """Whether ``table`` has the modality's columns with at least one value."""
    return all(c in table.column_names for c in modality.columns) and \
        any(table.column(c).null_count < table.num_rows for c in modality.columns)


class Encoder:
    """The model of one checkpoint, on one device, with the processed manifest its inputs must match.

    ``cache_dir`` is the workspace cache: with a frozen text model, text vectors come from (and go to)
    the cache that training filled, so ``cmma embed`` recomputes nothing. ``model_cache`` (default: ``cache_dir``) is
    the workspace cache for query-time copies of frozen models (a traced sentence model,
    :mod:`~cmma_cli.modalities.text.fast`), used even where embeddings are not cached (a query).

    ``modalities`` (default: every modality of the run) are the encoders built and loaded now; the others are
    built on first use (:meth:`need`), so one query loads only its own encoder (a pattern query never builds the
    structure backbone). :attr:`modalities` always lists all of the run's.
    """

    def __init__(self, checkpoint: Path, processed_manifest: dict[str, Any], cache_dir: Path | None = None,
                 device: str = "auto", batch_size: int = 256, workers: int | None = None, show_progress: bool = True,
                 modalities: list[str] | None = None, model_cache: Path | None = None):
        if batch_size < 1:
            raise CMMAError(f"--batch-size must be at least 1, not {batch_size}.")
        self.device = pick_device(device)
        self.model, self.checkpoint = load_model(checkpoint, self.device, modalities)
        self.spec: dict[str, Any] = self.checkpoint["spec"]
        self.modalities: list[str] = list(self.spec["modalities"])
        self.dim = int(self.spec["embed_dim"])
        self.processed_manifest = processed_manifest
        self.preprocess = preprocess_config(processed_manifest)
        self.ctx = Context(processed_manifest, cache_dir=cache_dir, show_progress=show_progress)
        self.model_cache = Path(model_cache) if model_cache is not None else cache_dir
        self.ctx.model_cache = self.model_cache  # read by the text modality's prepare (cached_embeddings)
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

    def need(self, modalities: list[str]) -> None:
        """Build and load, once, the encoders and heads of those ``modalities`` of the run not loaded yet."""
        if any(m in self.modalities and m not in self.model.encoders for m in modalities):
            add_modalities(self.model, self.checkpoint, modalities, self.device)

    def settings(self, modality: str) -> Any:
        """The preprocess section of ``modality`` that ``processed/`` was made with (None: it has none)."""
        return getattr(self.preprocess, modality, None)

    @torch.no_grad()
    def embed_table(self, modality: str, table: pa.Table, advance: Callable[[int], Any] | None = None,
                    spec: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, vectors)``: the rows of ``table`` that have ``modality`` and their L2-normalised embeddings.

        ``advance(n)`` is called after each batch of ``n`` rows (a progress bar's); without it the
        method shows its own bar when there is more than one batch. ``spec`` replaces the run's spec of the
        modality's data handling (the text sources a user's table is read with); the weights stay the run's.
        """
        self.need([modality])
        materials = MaterialSet(table, {modality: spec or self.spec["encoders"][modality]}, self.ctx)
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

    # ------------------------------------------------------------------------------------- new inputs

    def rows(self, modality: Modality, got: UserInputs, wanted: list[str] | None = None) -> tuple[pa.Table, list[dict[str, str]]]:
        """A processed-like table of what ``modality`` read from a user's files, and the new rejects.

        Whole materials are featurized by ``modality`` and every modality of ``wanted`` (default: the
        run's), in registry order, exactly as ``cmma preprocess`` featurizes ``raw/``; other inputs already
        are the modality's columns.
        """
        if got.structures is None:
            return got.table(modality.fields), []
        from cmma_cli.preprocess.featurize import featurize
        from cmma_cli.preprocess.stream import modality_table

        wanted = self.modalities if wanted is None else wanted
        modalities = [m for m in REGISTRY.values() if m is modality or m.name in wanted]
        results = []
        show = self.show_progress and len(got.ids) > 1
        with warnings.catch_warnings(), (progress() if show else nullcontext()) as bar:
            warnings.simplefilter("ignore")
            if show:
                task = bar.add_task(f"Featurizing new materials ({', '.join(m.name for m in modalities)})",
                                    total=len(got.ids))
            for mid, structure in zip(got.ids, got.structures):
                linked = {name: found[mid] for name, found in got.linked.items() if mid in found}
                results.append(featurize(mid, structure, linked, self.preprocess, modalities))
                if show:
                    bar.advance(task)
        table = modality_table(pa.table({"material_id": pa.array(got.ids, pa.string())}), results, modalities)
        rejects = [{"source": s, "item": i, "reason": why} for r in results for s, i, why in r.rejects]
        return table, rejects

    def embed_new(self, table: pa.Table) -> dict[str, tuple[list[str], np.ndarray]]:
        """``{modality: (ids, vectors)}`` for every trained modality ``table`` (processed-like rows) has values of."""
        ids = [str(m) for m in table.column("material_id").to_pylist()]
        out = {}
        for name in self.modalities:
            modality = get_modality(name)
            if not _has_values(table, modality):
                continue
            self.need([name])
            rows, vectors = modality.embed_new(self, table)
            out[name] = ([ids[int(r)] for r in rows], vectors)
        return out

    def embed_query(self, modality: str, value: Any, source: str | None = None) -> np.ndarray:
        """The ``(d,)`` embedding of one query of ``modality`` (a typed text, a file), through the ``source``
        encoder (default: the modality's own; a CIF may also go through the XRD encoder as its computed pattern)."""
        reader = get_modality(modality)
        source = source or reader.query_sources()[0]
        self.need([source])
        got = reader.read_query(value, self.settings(modality))
        table, rejects = self.rows(reader, got, wanted=[source])
        encoder = get_modality(source)
        rows, vectors = encoder.embed_new(self, table) if _has_values(table, encoder) else (np.zeros(0, np.int64), None)
        if len(rows) == 0:
            reasons = [r["reason"] for r in [*got.rejects, *rejects]]
            raise CMMAError(reader.unusable_query(value, reasons[0] if reasons else f"it gives no {source} input"))
        return vectors[0]
