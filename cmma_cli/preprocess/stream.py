"""The streaming half of ``cmma preprocess``: raw chunks in, featurized Parquet row groups out.

The raw materials table is read ``chunk_size`` rows at a time; a pool of worker processes featurizes a
chunk (crystal graph + XRD, :mod:`~cmma_cli.preprocess.featurize`) while the chunk before it is turned
into Arrow columns and written as one row group, so memory stays flat however many materials there
are. Nothing here knows about configs, manifests or the terminal.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import warnings
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pymatgen.analysis.diffraction.xrd import XRDCalculator

from cmma_cli.preprocess.featurize import Featurized, FeaturizeOptions, featurize, featurize_chunk, init_worker

#: The modality columns appended to the raw identity / property columns, with their Arrow types.
MODALITY_FIELDS = [
    pa.field("atomic_numbers", pa.list_(pa.int16())),
    pa.field("edge_src", pa.list_(pa.int32())),
    pa.field("edge_dst", pa.list_(pa.int32())),
    pa.field("edge_dist", pa.list_(pa.float32())),
    pa.field("edge_vec", pa.list_(pa.float32())),
    pa.field("description", pa.string()),
    pa.field("synthesis_texts", pa.list_(pa.string())),
    pa.field("recipe_ids", pa.list_(pa.string())),
    pa.field("xrd", pa.list_(pa.float32())),
    pa.field("xrd_source", pa.string()),
    pa.field("image_path", pa.string()),
]

#: Modalities as counted in the summary and the manifest: name -> the column that is non-null.
MODALITY_COLUMNS = {
    "structure": "atomic_numbers",
    "synthesis": "synthesis_texts",
    "description": "description",
    "xrd": "xrd",
    "image": "image_path",
}


# ---------------------------------------------------------------------------------------- columns


def list_array(values: list[np.ndarray | None], value_type: pa.DataType) -> pa.Array:
    """A list column from per-row numpy arrays, ``None`` rows null."""
    lengths = np.array([0 if v is None else len(v) for v in values], dtype=np.int64)
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    present = [v for v in values if v is not None]
    flat = np.concatenate(present) if present else np.zeros(0)
    mask = pa.array([v is None for v in values], type=pa.bool_())
    return pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(flat.astype(value_type.to_pandas_dtype(), copy=False), type=value_type), mask=mask
    )


@dataclass
class LinkedData:
    """What the stage gathered before streaming, keyed by material id: recipe texts (with their ids),
    descriptions and image paths."""

    synthesis: dict[str, tuple[list[str], list[str]]]
    descriptions: dict[str, str]
    images: dict[str, str]


def modality_table(base: pa.Table, results: list[Featurized], texts: LinkedData) -> pa.Table:
    """``base`` (a chunk's raw identity and property columns) with every modality column appended."""
    ids = [r.material_id for r in results]
    graphs = [r.graph for r in results]
    synth = [texts.synthesis.get(m) for m in ids]
    columns = {
        "atomic_numbers": list_array([g.atomic_numbers if g else None for g in graphs], pa.int16()),
        "edge_src": list_array([g.edge_src if g else None for g in graphs], pa.int32()),
        "edge_dst": list_array([g.edge_dst if g else None for g in graphs], pa.int32()),
        "edge_dist": list_array([g.edge_dist if g else None for g in graphs], pa.float32()),
        "edge_vec": list_array([g.edge_vec if g else None for g in graphs], pa.float32()),
        "description": pa.array([texts.descriptions.get(m) for m in ids], type=pa.string()),
        "synthesis_texts": pa.array([s[0] if s else None for s in synth], type=pa.list_(pa.string())),
        "recipe_ids": pa.array([s[1] if s else None for s in synth], type=pa.list_(pa.string())),
        "xrd": list_array([r.xrd for r in results], pa.float32()),
        "xrd_source": pa.array([r.xrd_source for r in results], type=pa.string()),
        "image_path": pa.array([texts.images.get(m) for m in ids], type=pa.string()),
    }
    for name, column in columns.items():
        base = base.append_column(name, column)
    return base


# --------------------------------------------------------------------------------------- streaming


@dataclass
class Tally:
    """Running counts while chunks stream past."""

    materials: int = 0
    edges: int = 0
    with_isolated: int = 0
    measured_xrd: int = 0
    flags: list[pd.DataFrame] = field(default_factory=list)  # material_id + one bool per modality
    rejects: list[dict] = field(default_factory=list)

    def add(self, table: pa.Table, results: list[Featurized]) -> None:
        self.materials += table.num_rows
        for r in results:
            if r.graph is not None:
                self.edges += r.graph.num_edges
                self.with_isolated += r.graph.isolated > 0
            self.measured_xrd += r.xrd_source == "measured"
            self.rejects.extend({"source": s, "item": i, "reason": why} for s, i, why in r.rejects)
        flags = {"material_id": table.column("material_id").to_pylist()}
        for name, column in MODALITY_COLUMNS.items():
            flags[name] = table.column(column).is_valid().to_numpy(zero_copy_only=False)
        self.flags.append(pd.DataFrame(flags))


def raw_chunks(
    path: Path, chunk_size: int, measured: dict[str, Path], rejects: list[dict]
) -> Iterator[tuple[pa.Table, list[tuple[str, Any, str | None]]]]:
    """(raw columns without ``structure``, featurize items) per chunk; repeated ids are dropped.

    No read-ahead (``pre_buffer``, threads): reading is never the bottleneck, and read-ahead would hold
    several row groups of structure JSON in memory at once.
    """
    seen: set[str] = set()
    reader = pq.ParquetFile(path, pre_buffer=False)
    for batch in reader.iter_batches(batch_size=chunk_size, use_threads=False):
        table = pa.Table.from_batches([batch])
        ids = [str(m) for m in table.column("material_id").to_pylist()]
        keep = []
        for mid in ids:
            first = mid not in seen
            keep.append(first)
            if first:
                seen.add(mid)
            else:
                rejects.append(
                    {"source": "materials", "item": mid, "reason": "repeated material_id (kept the first row)"}
                )
        if not all(keep):
            table = table.filter(pa.array(keep))
            ids = [m for m, k in zip(ids, keep) if k]
        structures = table.column("structure").to_pylist()
        items = [(mid, s, str(measured[mid]) if mid in measured else None) for mid, s in zip(ids, structures)]
        yield table.drop_columns(["structure"]), items


@contextmanager
def worker_pool(workers: int, options: FeaturizeOptions):
    """A pool of ``workers`` processes set up with ``options``, or ``None`` to work in this process.

    Workers come from a fork server that has imported pymatgen once (``spawn`` where there is none),
    never from a plain fork of this process, whose pyarrow (or torch) threads could leave a child
    deadlocked. As with any of these start methods, a script calling :func:`run_preprocess` with
    several workers needs the usual ``if __name__ == "__main__":`` guard.
    """
    if workers <= 1:
        yield None
        return
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["cmma_cli.preprocess.featurize"])
    else:
        context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=init_worker, initargs=(options,)) as pool:
        yield pool


def featurized_chunks(chunks, options: FeaturizeOptions, pool, workers: int, on_progress):
    """Featurize chunk by chunk, in the pool (keeping the next chunk queued) or, without one, in this process."""
    if pool is None:
        calculator = XRDCalculator(wavelength=options.grid.wavelength)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for base, items in chunks:
                results = []
                for mid, text, measured in items:
                    results.append(featurize(mid, text, measured, options, calculator))
                    on_progress(1)
                yield base, results
        return
    pending: deque = deque()

    def submit(base, items):
        step = max(1, math.ceil(len(items) / (workers * 4)))
        parts = [items[i : i + step] for i in range(0, len(items), step)]
        pending.append((base, pool.imap(featurize_chunk, parts), [len(p) for p in parts]))

    def collect():
        base, iterator, sizes = pending.popleft()
        results = []
        for part, size in zip(iterator, sizes):
            results.extend(part)
            on_progress(size)
        return base, results

    for base, items in chunks:
        submit(base, items)
        if len(pending) > 1:
            yield collect()
    while pending:
        yield collect()


class ParquetStream:
    """One Parquet file written row group by row group, under a temporary name until :meth:`close`."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.writer = pq.ParquetWriter(self.tmp, schema)

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)

    def close(self) -> None:
        self.writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.writer.close()
        self.tmp.unlink(missing_ok=True)
