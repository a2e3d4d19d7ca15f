"""The streaming half of ``cmma preprocess``: raw chunks in, featurized Parquet row groups out.

The raw materials table is read ``chunk_size`` rows at a time; a pool of worker processes featurizes a
chunk (every modality's columns, :mod:`~cmma_cli.preprocess.featurize`) while the chunk before it is turned
into Arrow columns and written as one row group, so memory stays flat however many materials there
are. Nothing here knows about configs, manifests or the terminal.
"""

from __future__ import annotations

import math
import multiprocessing
import warnings
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from cmma_cli.modalities.base import Modality
from cmma_cli.modalities.columns import column_array
from cmma_cli.preprocess.featurize import Featurized, featurize, featurize_chunk, init_worker
from cmma_cli.sources.schema import STRUCTURE_COLUMN

# ---------------------------------------------------------------------------------------- columns


def modality_fields(modalities: list[Modality]) -> list[pa.Field]:
    """The processed columns every modality writes, in registry order, with their Arrow types."""
    return [f for m in modalities for f in m.fields]


def modality_table(base: pa.Table, results: list[Featurized], modalities: list[Modality]) -> pa.Table:
    """``base`` (a chunk's raw identity and property columns) with every modality's columns appended."""
    for f in modality_fields(modalities):
        base = base.append_column(f.name, column_array([r.values.get(f.name) for r in results], f))
    return base


def clear_non_finite(table: pa.Table, counts: dict[str, int]) -> pa.Table:
    """``table`` with every infinite value of its floating-point columns made null (``counts[column]`` adds how
    many): a raw table from an older fetch may still hold the ``inf`` of a user's CSV."""
    import pyarrow.compute as pc

    for i, f in enumerate(table.schema):
        if not pa.types.is_floating(f.type):
            continue
        column = table.column(i)
        bad = pc.fill_null(pc.is_inf(column), False)
        n = pc.sum(bad).as_py() or 0
        if n:
            table = table.set_column(i, f, pc.if_else(bad, pa.scalar(None, f.type), column))
            counts[f.name] = counts.get(f.name, 0) + int(n)
    return table


# --------------------------------------------------------------------------------------- streaming


@dataclass
class Tally:
    """Running counts while chunks stream past."""

    modalities: list[Modality]
    materials: int = 0
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # each modality's tally(), summed
    flags: list[pd.DataFrame] = field(default_factory=list)  # material_id + one bool per counted view
    rejects: list[dict] = field(default_factory=list)

    def labels(self) -> dict[str, str]:
        """``{label: column}`` of the views the summary counts (a modality may count several)."""
        return {label: column for m in self.modalities for label, column in m.counts().items()}

    def add(self, table: pa.Table, results: list[Featurized]) -> None:
        self.materials += table.num_rows
        for r in results:
            self.rejects.extend({"source": s, "item": i, "reason": why} for s, i, why in r.rejects)
        for m in self.modalities:
            for key, part in m.tally(table).items():
                total = self.counts.setdefault(key, {})
                for name, n in part.items():
                    total[name] = total.get(name, 0) + int(n)
        flags = {"material_id": table.column("material_id").to_pylist()}
        for label, column in self.labels().items():
            flags[label] = table.column(column).is_valid().to_numpy(zero_copy_only=False)
        self.flags.append(pd.DataFrame(flags))


def raw_chunks(
    path: Path, chunk_size: int, linked: dict[str, dict[str, Any]], rejects: list[dict]
) -> Iterator[tuple[pa.Table, list[tuple[str, Any, dict[str, Any]]]]]:
    """(raw columns without the structure, featurize items) per chunk; repeated ids are dropped.

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
        structures = table.column(STRUCTURE_COLUMN).to_pylist()
        items = [(mid, s, {m: found[mid] for m, found in linked.items() if mid in found})
                 for mid, s in zip(ids, structures)]
        yield table.drop_columns([STRUCTURE_COLUMN]), items


@contextmanager
def worker_pool(workers: int, cfg: Any, modalities: list[Modality]):
    """A pool of ``workers`` processes set up with ``cfg`` and ``modalities``, or ``None`` to work in this process.

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
        context.set_forkserver_preload(["cmma_cli.forkserver_guard", "cmma_cli.preprocess.featurize"])
    else:
        context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=init_worker, initargs=(cfg, modalities)) as pool:
        yield pool


def featurized_chunks(chunks, cfg: Any, modalities: list[Modality], pool, workers: int, on_progress):
    """Featurize chunk by chunk, in the pool (keeping the next chunk queued) or, without one, in this process."""
    if pool is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for base, items in chunks:
                results = []
                for mid, text, linked in items:
                    results.append(featurize(mid, text, linked, cfg, modalities))
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
