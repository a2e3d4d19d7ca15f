"""What every modality provides: a spec, the data it reads, the batch it collates and its encoder.

A modality turns columns of ``processed/materials.parquet`` into model inputs in three steps:

1. :meth:`Modality.spec` -- the JSON-able facts needed to rebuild its encoder without the data (the
   XRD grid length, the text model, the graph cutoff); checkpoints store it.
2. :meth:`Modality.prepare` -- once per run: the table's columns as flat numpy arrays (plus
   ``present``, which rows have this modality), cheap to slice and to send to loader workers.
3. :meth:`Modality.collate` -- per batch: the inputs of the given rows (all of which have the
   modality), as tensors. It runs in data-loader workers, so it is numpy, not Python loops.

:meth:`Modality.encoder` builds the ``nn.Module`` that maps those inputs to one vector per row
(``out_dim`` wide); the shared projection heads and normalisation live in :mod:`cmma_cli.model`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn


@dataclass
class Context:
    """What ``spec`` and ``prepare`` may need beyond the table: the processed manifest and a cache folder."""

    processed_manifest: dict[str, Any]
    cache_dir: Path | None = None
    show_progress: bool = True


class Prepared:
    """A modality's data for every row of a table; ``present[i]`` says whether row ``i`` has it."""

    present: np.ndarray


class Modality(ABC):
    """Base class of a modality; subclasses are registered in :mod:`cmma_cli.modalities`."""

    name: str = ""
    columns: tuple[str, ...] = ()  # the processed columns it reads

    @abstractmethod
    def spec(self, cfg: Any, table: pa.Table | None, ctx: Context) -> dict[str, Any]:
        """The facts its encoder is built from (JSON-able); ``table`` is the training table, when there is one."""

    @abstractmethod
    def prepare(self, table: pa.Table, spec: dict[str, Any], ctx: Context) -> Prepared:
        """This modality's data for every row of ``table``."""

    @abstractmethod
    def collate(self, data: Prepared, rows: np.ndarray, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        """Inputs of ``rows`` (which all have the modality); ``rng`` is None for deterministic evaluation."""

    @abstractmethod
    def encoder(self, spec: dict[str, Any]) -> nn.Module:
        """A fresh encoder with an ``out_dim`` attribute, mapping collated inputs to ``(rows, out_dim)``."""


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
