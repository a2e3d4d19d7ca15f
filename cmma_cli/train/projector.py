"""TensorBoard's embedding projector, fed once at the end of training with the best model's embeddings.

Each modality's embeddings of the val materials (the train materials when there is no val split), at most
:data:`PROJECTOR_MATERIALS` of them, with the material id, formula and crystal system as metadata: open
``tensorboard --logdir runs/<run>/tensorboard`` and pick the Projector tab (``--no-projector`` leaves it out).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cmma_cli.modalities.batches import MaterialSet, to_device

#: The most materials the projector is given (a sample, seeded, when there are more): the projector's t-SNE and
#: UMAP stay interactive, and writing them stays a matter of seconds.
PROJECTOR_MATERIALS = 2000

#: The metadata columns, where ``processed/materials.parquet`` has them (``material_id`` always).
METADATA = ("material_id", "formula", "crystal_system")


def projector_rows(rows: np.ndarray, seed: int, cap: int = PROJECTOR_MATERIALS) -> np.ndarray:
    """``rows``, or a seeded sample of ``cap`` of them in their order."""
    rows = np.asarray(rows)
    if len(rows) <= cap:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, size=cap, replace=False))


def metadata(processed: Path, ids: list[str]) -> tuple[list[str], list[list[str]]]:
    """(header, one row of strings per id): :data:`METADATA` that the processed materials have, "" where unknown."""
    path = processed / "materials.parquet"
    names = pq.ParquetFile(path).schema_arrow.names
    header = [c for c in METADATA if c in names]
    table = pq.read_table(path, columns=header)
    index = {mid: i for i, mid in enumerate(table["material_id"].to_pylist())}
    columns = {c: table[c].to_pylist() for c in header}

    def text(value) -> str:
        return "" if value is None else " ".join(str(value).split())  # no tab or newline may reach the TSV

    out = []
    for mid in ids:
        i = index.get(mid)
        out.append([text(mid) if c == "material_id" else ("" if i is None else text(columns[c][i])) for c in header])
    return header, out


@torch.no_grad()
def projector_tables(model, materials: MaterialSet, table: pa.Table, rows: np.ndarray, batch_size: int,
                     device: torch.device, autocast, processed: Path
                     ) -> tuple[list[str], dict[str, tuple[torch.Tensor, list[list[str]]]]]:
    """(metadata header, ``{modality: (embeddings (n_m, d), metadata rows)}``) of ``rows`` (rows of ``table``, the
    table ``materials`` was built from), each modality over the materials that have it."""
    was_training = model.training
    model.eval()
    ids = table["material_id"].to_pylist()
    header, meta = metadata(processed, [ids[int(r)] for r in rows])
    vectors: dict[str, list[torch.Tensor]] = {m: [] for m in model.modalities}
    labels: dict[str, list[list[str]]] = {m: [] for m in model.modalities}
    for k, chunk in enumerate(np.array_split(np.arange(len(rows)), max(1, math.ceil(len(rows) / batch_size)))):
        batch = to_device(materials.collate(rows[chunk]), device)
        with autocast:
            features, _ = model(batch["inputs"], batch["masks"])
        for m in model.modalities:
            if m in features:
                keep = batch["masks"][m].cpu()
                vectors[m].append(features[m].float().cpu()[keep])
                labels[m] += [meta[int(i)] for i in chunk[keep.numpy()]]
    model.train(was_training)
    tables = {m: (torch.cat(vectors[m]), labels[m]) for m in model.modalities if labels[m]}
    return header, tables
