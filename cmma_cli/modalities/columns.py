"""Processed columns <-> numpy: what the modalities share to read list columns for a batch and to write them.

A list column is read as flat values plus offsets (:func:`csr`), so a batch of rows is gathered with
vectorised indexing (:func:`ragged_index`) instead of a Python loop per row; per-row numpy arrays are written
back the same way (:func:`list_array`, :func:`column_array`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


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
