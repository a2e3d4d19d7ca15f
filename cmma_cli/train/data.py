"""The processed rows training reads: the train and val splits, and which rows have a pair to learn from."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cmma_cli.errors import CMMAError
from cmma_cli.modalities import get_modality
from cmma_cli.modalities.batches import MaterialSet
from cmma_cli.workspace import Workspace


def read_splits(ws: Workspace, modalities: list[str], columns: list[str] | None = None,
                properties: list[str] = ()) -> tuple[pa.Table, pa.Table]:
    """The processed train and val rows: the columns the modalities read (or just ``columns``), and ``properties``."""
    path, splits_path = ws.processed / "materials.parquet", ws.processed / "splits.parquet"
    if not path.exists() or not splits_path.exists():
        raise CMMAError(f"{ws.processed} lacks materials.parquet or splits.parquet: run `cmma preprocess --force`.")
    if columns is None:
        columns = [c for m in modalities for c in get_modality(m).columns]
    columns = list(dict.fromkeys(["material_id", *columns, *properties]))
    available = pq.ParquetFile(path).schema_arrow.names
    table = pq.read_table(path, columns=[c for c in columns if c in available])
    splits = pq.read_table(splits_path, columns=["material_id", "split"])
    out = []
    for name in ("train", "val"):
        ids = splits.filter(pc.equal(splits["split"], name))["material_id"]
        out.append(table.filter(pc.is_in(table["material_id"], value_set=ids.combine_chunks())))
    return out[0], out[1]


def usable(materials: MaterialSet) -> np.ndarray:
    """Rows that have at least two configured modalities (a sample with one has no pair to learn from)."""
    return np.flatnonzero(materials.modality_counts() >= 2)
