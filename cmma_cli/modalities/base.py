"""What every modality provides, stage by stage. A modality is one module (or one small package) under
``modalities/`` plus one line in :data:`cmma_cli.modalities.REGISTRY`; no other module names it.

**Its settings.** ``preprocess_config`` and ``train_config`` are dataclasses (or None). Their fields become
options of ``cmma preprocess`` / ``cmma train`` and keys of a TOML ``--config`` file, named ``<modality>_<field>``
(``xrd_channels`` -> ``--xrd-channels``) unless the field's metadata names a flag (``field(metadata={"flag":
"cutoff"})``) and limited to ``metadata["choices"]`` (a tuple, or a function returning one) when given. The
help text is the field's trailing comment. Code reads them nested: ``cfg.xrd.channels``.

**preprocess** (``raw/`` -> ``processed/materials.parquet``):

1. :meth:`Modality.check` -- the preprocess settings, one sentence per mistake, before any data is read;
2. :meth:`Modality.gather` -- once, in the main process: what the modality needs per material from the
   raw tables or a user folder (texts, file paths), as ``{material_id: value}``; rejects go to ``ctx``;
3. :meth:`Modality.featurize` -- per material, in worker processes: the modality's processed columns from
   the parsed structure (or None) and what ``gather`` found for that material. ``fields`` lists the columns
   with their Arrow types; :meth:`Modality.tally` adds the modality's counts to the manifest.

**train** (the model):

1. :meth:`Modality.spec` -- the JSON-able facts needed to rebuild its encoder without the data (the
   XRD grid length, the text model, the graph cutoff); checkpoints store it.
2. :meth:`Modality.prepare` -- once per run: the table's columns as flat numpy arrays (plus
   ``present``, which rows have this modality), cheap to slice and to send to loader workers.
3. :meth:`Modality.collate` -- per batch: the inputs of the given rows (all of which have the
   modality), as tensors. It runs in data-loader workers, so it is numpy, not Python loops.
4. :meth:`Modality.encoder` builds the ``nn.Module`` that maps those inputs to one vector per row
   (``out_dim`` wide); the shared projection heads and normalisation live in :mod:`cmma_cli.model`.

Modules of a modality import torch and other heavy libraries inside functions (or from a sibling module
that only its ``encoder`` imports): the registry is read to build the command line, which must start fast.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from pymatgen.core import Structure


@dataclass
class Context:
    """What ``spec`` and ``prepare`` may need beyond the table: the processed manifest and a cache folder."""

    processed_manifest: dict[str, Any]
    cache_dir: Path | None = None
    show_progress: bool = True


class Prepared:
    """A modality's data for every row of a table; ``present[i]`` says whether row ``i`` has it."""

    present: np.ndarray


@dataclass
class GatherContext:
    """What :meth:`Modality.gather` may read: the raw folder, the material ids, and a list for reject rows."""

    raw_dir: Path
    material_ids: set[str]
    rejects: list[dict[str, str]] = field(default_factory=list)  # {"source", "item", "reason"}


@dataclass
class Item:
    """One material on its way through :meth:`Modality.featurize` (in a worker process).

    ``structure`` is None when the raw row has none that parses; a modality that finds the structure
    unusable for every structure-derived view (overlapping atoms, say) records why and sets it to None, so
    modalities after it in the registry see None too.
    """

    material_id: str
    structure: "Structure | None"
    linked: dict[str, Any]  # {modality: what its gather() found for this material}
    rejects: list[tuple[str, str, str]] = field(default_factory=list)  # (source, item, reason)

    def reject(self, source: str, item: str, reason: str) -> None:
        self.rejects.append((source, item, reason))


class Modality(ABC):
    """Base class of a modality; instances are registered in :mod:`cmma_cli.modalities`."""

    name: str = ""
    columns: tuple[str, ...] = ()  # the processed columns its encoder reads
    fields: tuple[pa.Field, ...] = ()  # every processed column preprocess writes for it, with its Arrow type
    train_config: type | None = None  # dataclass of its training settings (cfg.<name>)
    preprocess_config: type | None = None  # dataclass of its preprocess settings (cfg.<name>)
    evaluate_config: type | None = None  # dataclass of its evaluate settings (cfg.<name>)
    derived_keys: frozenset[str] = frozenset()  # spec entries measured on the data, not grounds to refuse a resume

    # ------------------------------------------------------------------------------------ preprocess

    def check(self, cfg: Any) -> None:
        """Refuse bad preprocess settings (``cfg`` is this modality's section) with one sentence each."""

    def gather(self, cfg: Any, ctx: GatherContext) -> dict[str, Any]:
        """``{material_id: value}`` that :meth:`featurize` needs, read once from ``raw/`` or a user folder."""
        return {}

    def featurize(self, item: Item, cfg: Any) -> dict[str, Any]:
        """This modality's processed columns of one material (``{column: value or None}``)."""
        return {}

    def counts(self) -> dict[str, str]:
        """What the preprocess summary and manifest count: ``{label: column that is non-null}``."""
        return {self.name: self.columns[0]} if self.columns else {}

    def tally(self, table: pa.Table) -> dict[str, int]:
        """Counts of a processed chunk this modality adds to the manifest (summed over chunks)."""
        return {}

    def notes(self, counts: dict[str, dict[str, int]]) -> list[str]:
        """Sentences for the preprocess summary, given every modality's summed :meth:`tally`."""
        return []

    def facts(self, cfg: Any) -> dict[str, Any]:
        """Top-level manifest entries this modality's preprocess settings imply (e.g. the XRD grid)."""
        return {}

    def folders(self, cfg: Any) -> dict[str, str | None]:
        """User folders among the preprocess settings (``{setting: path}``): fingerprinted, so a changed folder reruns."""
        return {}

    # ----------------------------------------------------------------------------------------- train

    @abstractmethod
    def spec(self, cfg: Any, table: pa.Table | None, ctx: Context) -> dict[str, Any]:
        """The facts its encoder is built from (JSON-able); ``cfg`` is this modality's training section and
        ``table`` the training table, when there is one."""

    def spec_columns(self) -> tuple[str, ...]:
        """The processed columns :meth:`spec` measures on the training table (none by default)."""
        return ()

    @abstractmethod
    def prepare(self, table: pa.Table, spec: dict[str, Any], ctx: Context) -> Prepared:
        """This modality's data for every row of ``table``."""

    @abstractmethod
    def collate(self, data: Prepared, rows: np.ndarray, rng: np.random.Generator | None) -> dict[str, "torch.Tensor"]:
        """Inputs of ``rows`` (which all have the modality); ``rng`` is None for deterministic evaluation."""

    @abstractmethod
    def encoder(self, spec: dict[str, Any]) -> "torch.nn.Module":
        """A fresh encoder with an ``out_dim`` attribute, mapping collated inputs to ``(rows, out_dim)``."""

    def learning_rate(self, cfg: Any) -> float | None:
        """Its encoder's own learning rate (None: the run's ``lr``)."""
        return None

    def loading_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        """``spec`` as used to rebuild the encoder for loading a checkpoint (no pretrained download needed)."""
        return spec

    def ablation_variants(self, cfg: Any) -> list[tuple[str, dict[str, Any]]]:
        """``--ablation encoder`` variants: ``(label, {setting: value})`` changes of this modality's section."""
        return []


# ------------------------------------------------------------------------------------ arrow helpers


def _combined(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def csr(column: pa.ChunkedArray | pa.Array, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A list column as (flat values, offsets of length rows + 1, valid mask); null rows are empty."""
    arr = _combined(column)
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.zeros(len(arr) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = arr.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return values, offsets, valid


def ragged_index(offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions in the flat values of the given rows' items, concatenated, and each row's item count."""
    starts = offsets[rows]
    counts = offsets[rows + 1] - starts
    total = int(counts.sum())
    shift = np.repeat(starts - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
    return np.arange(total, dtype=np.int64) + shift, counts


def list_array(values: list[np.ndarray | None], value_type: pa.DataType) -> pa.Array:
    """A list column from per-row numpy arrays, ``None`` rows null (built without a Python loop over values)."""
    lengths = np.array([0 if v is None else len(v) for v in values], dtype=np.int64)
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    present = [v for v in values if v is not None]
    flat = np.concatenate(present) if present else np.zeros(0)
    mask = pa.array([v is None for v in values], type=pa.bool_())
    return pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(flat.astype(value_type.to_pandas_dtype(), copy=False), type=value_type), mask=mask
    )


def column_array(values: list[Any], field_: pa.Field) -> pa.Array:
    """Per-row values as the Arrow column ``field_`` describes (numpy arrays for numeric lists, else Python values)."""
    kind = field_.type
    if pa.types.is_list(kind) and (pa.types.is_integer(kind.value_type) or pa.types.is_floating(kind.value_type)):
        if all(v is None or isinstance(v, np.ndarray) for v in values):
            return list_array(values, kind.value_type)
    return pa.array(values, type=kind)
