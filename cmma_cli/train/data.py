"""The processed rows training reads: the train and val splits, and which rows have a pair to learn from."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cmma_cli.errors import CMMAError
from cmma_cli.modalities import get_modality
from cmma_cli.modalities.batches import MaterialSet
from cmma_cli.workspace import Workspace, manifest_hash


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


def with_recipes(ws: Workspace, table: pa.Table, split: str, modalities: list[str]) -> tuple[pa.Table, int]:
    """``table`` (processed rows of ``split``) followed by the recipe rows of that split
    (``processed/recipes.parquet``: a recipe's text and target composition, no structure) that have two or more of
    ``modalities`` (a pair to learn from), with the columns of ``table`` that the recipe rows have (the rest
    null); and how many recipe rows were added."""
    from cmma_cli.preprocess.recipes import RECIPES_FILE

    path = ws.processed / RECIPES_FILE
    if not path.exists():
        return table, 0
    available = pq.ParquetFile(path).schema_arrow.names
    recipes = pq.read_table(path, columns=[c for c in table.column_names if c in available] + ["split"])
    recipes = recipes.filter(pc.equal(recipes["split"], split)).drop_columns(["split"])
    have = []
    for m in modalities:  # a modality is there when any of its columns is
        cols = [c for c in get_modality(m).columns if c in recipes.column_names]
        if cols:
            have.append(np.any([recipes[c].is_valid().to_numpy(zero_copy_only=False) for c in cols], axis=0))
    if len(have) < 2:
        return table, 0
    recipes = recipes.filter(pa.array(np.sum(have, axis=0) >= 2))
    if recipes.num_rows == 0:
        return table, 0
    recipes = recipes.cast(pa.schema([table.schema.field(c) for c in recipes.column_names]))
    return pa.concat_tables([table, recipes], promote_options="default").select(table.column_names), recipes.num_rows


def usable(materials: MaterialSet) -> np.ndarray:
    """Rows that have at least two configured modalities (a sample with one has no pair to learn from)."""
    return np.flatnonzero(materials.modality_counts() >= 2)


def split_digest(ws: Workspace) -> str:
    """A hash of which split each processed material is in (``splits.parquet``, order-independent)."""
    splits = pq.read_table(ws.processed / "splits.parquet", columns=["material_id", "split"])
    splits = splits.take(pc.sort_indices(splits, sort_keys=[("material_id", "ascending"), ("split", "ascending")]))
    digest = hashlib.sha256()
    for name in ("material_id", "split"):
        digest.update("\x1f".join(map(str, splits[name].to_pylist())).encode())
        digest.update(b"\x1e")
    return digest.hexdigest()[:16]


def data_identity(ws: Workspace, manifest: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint records of the processed data it trained on: the split's hash, the preprocess config (and
    its hash) and the raw inputs' hashes; ``cmma train --resume`` compares it with ``processed/`` now."""
    return {"splits": split_digest(ws), "config_hash": manifest.get("config_hash"),
            "config": manifest.get("config", {}), "inputs": manifest.get("inputs", {}),
            "manifest": manifest_hash(ws.processed)}
