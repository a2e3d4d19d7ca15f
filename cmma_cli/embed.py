"""``cmma embed``: every processed material through each trained encoder -> Parquet tables + FAISS indexes.

``<ws>/embeddings/<run>/`` (the embeddings contract, read by ``cmma evaluate`` and ``cmma retrieve``):

- ``<modality>.parquet`` for every modality of the run: ``material_id``, ``embedding`` (list<float32>,
  L2-normalised), one row per material that has the modality, plus any columns the modality adds
  (:meth:`~cmma_cli.modalities.base.Modality.embed_processed`: the text table's ``text_source``);
- the extra tables a modality declares (:attr:`~cmma_cli.modalities.base.Modality.embed_tables`: the text
  modality's ``synthesis.parquet``, ``recipe_id``, ``material_id``, ``embedding`` of each recipe link);
- ``unified.parquet``: ``material_id``, ``embedding`` (normalised mean of the material's modality
  embeddings), ``modalities`` (list<str>, which went into it);
- ``<name>.faiss`` beside each table (row i of the index = row i of the table), and ``manifest.json``.

Materials are read ``CHUNK`` rows at a time, so memory follows the vectors, not the graphs.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cmma_cli.config import EmbedConfig, as_dict
from cmma_cli.console import console, progress
from cmma_cli.errors import CMMAError
from cmma_cli.index import INDEX_KINDS, build_index, describe, save_index
from cmma_cli.workspace import Workspace, begin_stage, is_up_to_date, read_manifest, require_stage, write_arrow, write_manifest

STAGE = "embed"
CHECKPOINTS = ("best", "last")
#: The table of every material's normalised mean over its modalities.
UNIFIED = "unified"
#: Materials read from processed/ per step.
CHUNK = 8192


def tables() -> tuple[str, ...]:
    """Every table the stage may write, in the order it reports them: one per registered modality, the extra
    tables the modalities declare, then ``unified``."""
    from cmma_cli.modalities import REGISTRY

    extra = [t for m in REGISTRY.values() for t in m.embed_tables if t not in REGISTRY]
    return (*REGISTRY, *dict.fromkeys(extra), UNIFIED)


def extra_tables() -> dict[str, str]:
    """``{table: the column naming its rows}`` of the tables that are not one row per material (``synthesis``)."""
    from cmma_cli.modalities import REGISTRY

    return {t: key for m in REGISTRY.values() for t, key in m.embed_tables.items() if t not in REGISTRY}


def __getattr__(name: str) -> Any:
    if name == "TABLES":  # the registry's tables now (a modality may be registered after this import)
        return tables()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------- run + checkpoint


def resolve_checkpoint(ws: Workspace, run: str | None, checkpoint: str = "best") -> tuple[str, Path, Path]:
    """``(run name, run folder, checkpoint file)`` for ``--run`` and ``--checkpoint best|last|PATH``.

    No ``run``: the run the checkpoint file lies in, else the newest finished run.
    """
    if checkpoint not in CHECKPOINTS:
        path = Path(checkpoint).expanduser().resolve()
        if not path.is_file():
            raise CMMAError(f"The checkpoint {checkpoint} does not exist: pass --checkpoint best, last or a .pt file.")
        if run is None:
            run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        else:
            run_dir = ws.run_dir(run)
        return run_dir.name, run_dir, path
    if run is None:
        runs = ws.finished("train")
        if not runs:
            raise CMMAError(f"There is no finished training run in {ws.root / 'runs'}: run `cmma train` first.")
        run = runs[-1]
    run_dir = ws.run_dir(run)
    if not run_dir.is_dir():
        known = ", ".join(ws.finished("train")) or "none yet"
        raise CMMAError(f"There is no run {run!r} in {ws.root / 'runs'} (finished runs: {known}): pass one of them "
                        f"to --run, or train it with `cmma train --run {run}`.")
    path = run_dir / f"{checkpoint}.pt"
    if not path.is_file():
        raise CMMAError(f"Run {run!r} has no {checkpoint}.pt: train it first (`cmma train --run {run}`) or pass "
                        "--checkpoint with a .pt file from its checkpoints/ folder.")
    return run, run_dir, path


def file_digest(path: Path) -> str:
    """SHA-256 (16 hex digits) of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def stage_config(cfg: EmbedConfig, run: str, checkpoint: Path) -> dict[str, Any]:
    """What decides the output (recorded in the manifest): the config less the speed knobs, with the
    run resolved and the checkpoint's bytes fingerprinted, so a retrained checkpoint re-embeds."""
    config = as_dict(cfg)
    for key in ("batch_size", "device", "workers"):
        config.pop(key)
    config["run"] = run
    config["checkpoint_file"] = str(checkpoint)
    config["checkpoint_sha256"] = file_digest(checkpoint)
    return config


# ----------------------------------------------------------------------------------------------- tables


def vector_column(vectors: np.ndarray, block: int = 1 << 20) -> pa.ChunkedArray:
    """``(n, d)`` float32 -> a list<float32> column (one list per row), built without a Python loop."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    chunks = []
    for start in range(0, n, block):  # blocks keep each chunk's int32 offsets in range
        part = vectors[start : start + block]
        offsets = pa.array(np.arange(0, (len(part) + 1) * d, d, dtype=np.int32))
        chunks.append(pa.ListArray.from_arrays(offsets, pa.array(part.reshape(-1))))
    return pa.chunked_array(chunks, type=pa.list_(pa.float32()))


def read_vectors(path: Path, columns: list[str] | None = None) -> tuple[pa.Table, np.ndarray]:
    """An embeddings table (other columns) and its ``embedding`` column as an ``(n, d)`` float32 array."""
    table = pq.read_table(path, columns=None if columns is None else [*columns, "embedding"])
    column = table.column("embedding").combine_chunks()
    n = table.num_rows
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    vectors = flat.reshape(n, -1) if n else np.zeros((0, 0), dtype=np.float32)
    return table.drop_columns(["embedding"]), vectors


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def unify(ids: list[str], parts: dict[str, tuple[list[str], np.ndarray]]) -> tuple[list[str], np.ndarray, list[list[str]]]:
    """The normalised mean of each material's modality embeddings, in ``ids`` order (materials with none left out)."""
    position = {m: i for i, m in enumerate(ids)}
    dim = next((v.shape[1] for _, v in parts.values() if v.size), 0)
    total = np.zeros((len(ids), dim), dtype=np.float32)
    used: list[list[str]] = [[] for _ in ids]
    for modality, (part_ids, vectors) in parts.items():
        rows = np.fromiter((position[m] for m in part_ids), dtype=np.int64, count=len(part_ids))
        total[rows] += vectors  # ids are unique within a modality's table
        for r in rows:
            used[r].append(modality)
    keep = [i for i, u in enumerate(used) if u]
    return [ids[i] for i in keep], normalize(total[keep]), [used[i] for i in keep]


def clear_stage(out: Path) -> None:
    """Start ``out`` afresh: manifest first (so an interrupted run is not trusted), then the old tables."""
    begin_stage(out)
    for name in tables():
        for suffix in (".parquet", ".faiss"):
            (out / f"{name}{suffix}").unlink(missing_ok=True)


def write_embeddings(out: Path, name: str, columns: dict[str, Any], vectors: np.ndarray, cfg: EmbedConfig) -> dict[str, Any]:
    """``<name>.parquet`` (``columns`` + ``embedding``) and ``<name>.faiss`` in ``out``; returns the index facts."""
    table = pa.table({**columns, "embedding": vector_column(vectors)})
    write_arrow(table, out / f"{name}.parquet")
    index = build_index(vectors, cfg.index, cfg.nlist, cfg.nprobe)
    save_index(index, out / f"{name}.faiss")
    return {"rows": table.num_rows, **describe(index)}


# ------------------------------------------------------------------------------------------------ stage


def _processed_columns(path: Path, modality: str) -> list[str]:
    from cmma_cli.modalities import get_modality

    available = pq.ParquetFile(path).schema_arrow.names
    wanted = ["material_id", *(f.name for f in get_modality(modality).fields)]
    missing = [c for c in wanted if c not in available]
    if missing:
        raise CMMAError(f"{path} lacks the {modality} columns {missing}: rerun `cmma preprocess --force`.")
    return wanted


def _concat(parts: list[tuple[dict[str, Any], np.ndarray]], dim: int) -> tuple[dict[str, Any], np.ndarray]:
    columns = {key: pa.chunked_array([cols[key] for cols, _ in parts]) for key in parts[0][0]}
    vectors = [v for _, v in parts if len(v)]
    return columns, (np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32))


def embed_processed(encoder, path: Path, modality: str, bar) -> dict[str, tuple[dict[str, Any], np.ndarray]]:
    """``{table: (columns, vectors)}``: the embeddings tables of ``modality`` for the processed materials
    (:meth:`~cmma_cli.modalities.base.Modality.embed_processed`), read ``CHUNK`` rows at a time."""
    from cmma_cli.modalities import get_modality

    m = get_modality(modality)
    file = pq.ParquetFile(path)
    columns = _processed_columns(path, modality)
    task = bar.add_task(f"Embedding {modality}", total=file.metadata.num_rows)
    parts: dict[str, list[tuple[dict[str, Any], np.ndarray]]] = {}
    done = 0
    chunks = (pa.Table.from_batches([b]) for b in file.iter_batches(batch_size=CHUNK, columns=columns))
    for table in chunks:
        for name, part in m.embed_processed(encoder, table, advance=lambda n: bar.advance(task, n)).items():
            parts.setdefault(name, []).append(part)
        done += table.num_rows
        bar.update(task, completed=done)
    if not parts:  # no materials at all: the tables, empty
        empty = file.schema_arrow.empty_table().select(columns)
        parts = {name: [part] for name, part in m.embed_processed(encoder, empty).items()}
    return {name: _concat(found, encoder.dim) for name, found in parts.items()}


def check_config(cfg: EmbedConfig) -> None:
    """One sentence per option out of range, before any work starts."""
    if cfg.index not in INDEX_KINDS:
        raise CMMAError(f"--index must be one of {', '.join(INDEX_KINDS)}, not {cfg.index!r}.")
    for name, low in (("batch_size", 1), ("nprobe", 1), ("nlist", 1), ("workers", 0)):
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise CMMAError(f"--{name.replace('_', '-')} must be at least {low}, not {value}.")


def run_embed(ws: Workspace, cfg: EmbedConfig, force: bool = False) -> dict[str, Any]:
    """Embed every processed material with a trained run into ``embeddings/<run>/``; returns the manifest."""
    check_config(cfg)
    processed = require_stage(ws.processed, "preprocess")
    run, run_dir, checkpoint = resolve_checkpoint(ws, cfg.run, cfg.checkpoint)
    if read_manifest(run_dir) is None:
        raise CMMAError(f"Run {run!r} has not finished training (no manifest in {run_dir}): let `cmma train` finish, "
                        f"or continue it with `cmma train --run {run} --resume latest`.")
    config = stage_config(cfg, run, checkpoint)
    out = ws.embeddings_dir(run)
    inputs = [ws.processed, run_dir]
    if not force and is_up_to_date(out, config, inputs):
        console.print(f"embeddings/{run} is up to date with this run, checkpoint and processed data: skipped "
                      "(use --force to redo).", highlight=False, soft_wrap=True)
        return read_manifest(out)

    from cmma_cli.encode import Encoder

    started = time.perf_counter()
    clear_stage(out)
    encoder = Encoder(checkpoint, processed, cache_dir=ws.cache, device=cfg.device,
                      batch_size=cfg.batch_size, workers=cfg.workers)
    path = ws.processed / "materials.parquet"
    all_ids = [str(m) for m in pq.read_table(path, columns=["material_id"]).column("material_id").to_pylist()]
    console.print(f"Embedding {len(all_ids)} materials with run {run} ({checkpoint.name}, epoch "
                  f"{encoder.checkpoint.get('epoch')}) on {encoder.device.type}: {', '.join(encoder.modalities)}.",
                  highlight=False, soft_wrap=True)

    made: dict[str, tuple[dict[str, Any], np.ndarray]] = {}
    with progress() as bar:
        for modality in encoder.modalities:
            made.update(embed_processed(encoder, path, modality, bar))
    written: dict[str, dict[str, Any]] = {}
    for name in tables():
        if name in made:
            written[name] = write_embeddings(out, name, *made[name], cfg)
    parts = {m: ([str(i) for i in made[m][0]["material_id"].to_pylist()], made[m][1])
             for m in encoder.modalities if m in made}
    unified_ids, unified, used = unify(all_ids, parts)
    written[UNIFIED] = write_embeddings(
        out, UNIFIED, {"material_id": pa.array(unified_ids, pa.string()),
                       "modalities": pa.array(used, pa.list_(pa.string()))}, unified, cfg)

    seconds = time.perf_counter() - started
    counts = {name: written[name]["rows"] for name in tables() if name in written}
    manifest = write_manifest(
        out, STAGE, config, inputs=inputs, rows=counts,
        extra={
            "run": run,
            "checkpoint": {"path": ws.portable(checkpoint), "name": cfg.checkpoint if cfg.checkpoint in CHECKPOINTS else "path",
                           "epoch": encoder.checkpoint.get("epoch"), "sha256": config["checkpoint_sha256"],
                           "size": checkpoint.stat().st_size, "mtime_ns": checkpoint.stat().st_mtime_ns},
            "dim": encoder.dim,
            "modalities": encoder.modalities,
            "counts": counts,
            "indexes": {name: {k: v for k, v in facts.items() if k != "rows"} for name, facts in written.items()},
            "device": encoder.device.type,
            "seconds": round(seconds, 2),
        },
    )
    _summary(out, written, len(all_ids), seconds)
    return manifest


def _summary(out: Path, written: dict[str, dict[str, Any]], materials: int, seconds: float) -> None:
    from rich.table import Table

    table = Table(title=f"{out}: embeddings and indexes", title_justify="left")
    for col, justify in (("table", "left"), ("rows", "right"), ("index", "left")):
        table.add_column(col, justify=justify)
    for name in tables():
        if name in written:
            facts = written[name]
            kind = facts["kind"] if facts["kind"] == "flat" else f"ivf (nlist {facts['nlist']}, nprobe {facts['nprobe']})"
            table.add_row(name, str(facts["rows"]), kind)
    console.print(table)
    console.print(f"Embedded {materials} materials in {seconds:.1f} s. Next: `cmma retrieve \"a text query\"`.",
                  highlight=False, soft_wrap=True)
