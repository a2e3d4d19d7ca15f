"""``cmma embed``: every processed material through each trained encoder -> Parquet tables + FAISS indexes.

What it writes to ``<ws>/embeddings/<run>/`` is described in :mod:`cmma_cli.embeddings` (the contract that
``cmma retrieve`` and ``cmma evaluate`` read). Materials are read ``CHUNK`` rows at a time, so memory follows
the vectors, not the graphs.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cmma_cli.config import EmbedConfig, as_dict
from cmma_cli.console import console, esc, progress
from cmma_cli.embeddings import UNIFIED, clear_stage, tables, unify, write_embeddings
from cmma_cli.errors import CMMAError
from cmma_cli.index import INDEX_KINDS
from cmma_cli.workspace import (
    Workspace,
    file_digest,
    is_up_to_date,
    manifest_problem,
    read_manifest,
    require_stage,
    stage_lock,
    write_manifest,
)

STAGE = "embed"
CHECKPOINTS = ("best", "last")
#: Materials read from processed/ per step.
CHUNK = 8192


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
        problem = manifest_problem(run_dir)
        where = f"its manifest {run_dir / 'manifest.json'} {problem}" if problem else f"no manifest in {run_dir}"
        raise CMMAError(f"Run {run!r} has not finished training ({where}): let `cmma train` finish, "
                        f"or continue it with `cmma train --run {run} --resume latest`.")
    config = stage_config(cfg, run, checkpoint)
    out = ws.embeddings_dir(run)
    with stage_lock(out, f"The embeddings of run {run!r}"):
        return _embed_locked(ws, cfg, force, processed, run, run_dir, checkpoint, config, out)


def staging_dir(out: Path) -> Path:
    """The temporary sibling folder a new ``out`` is written into before it replaces the old one."""
    return out.parent / f".{out.name}.new-{os.getpid()}"


def _swap_in(new: Path, out: Path) -> None:
    """Replace the stage's tables in ``out`` by the complete set in ``new`` (other files, e.g. ``inputs/``, stay).

    The manifest goes first (:func:`~cmma_cli.embeddings.clear_stage`), then each file is renamed into place; the
    caller writes the new manifest last.
    """
    clear_stage(out)
    for path in sorted(new.iterdir()):
        os.replace(path, out / path.name)
    shutil.rmtree(new, ignore_errors=True)


def _embed_locked(ws: Workspace, cfg: EmbedConfig, force: bool, processed: dict[str, Any], run: str, run_dir: Path,
                  checkpoint: Path, config: dict[str, Any], out: Path) -> dict[str, Any]:
    inputs = [ws.processed, run_dir]
    if not force and is_up_to_date(out, config, inputs):
        console.print(f"embeddings/{run} is up to date with this run, checkpoint and processed data: skipped "
                      "(use --force to redo).", highlight=False, soft_wrap=True)
        return read_manifest(out)

    from cmma_cli.encode import Encoder

    started = time.perf_counter()
    # the checkpoint is read (and refused when bad) before anything of the current embeddings is touched
    encoder = Encoder(checkpoint, processed, cache_dir=ws.cache, device=cfg.device,
                      batch_size=cfg.batch_size, workers=cfg.workers)
    for stale in out.parent.glob(f".{out.name}.new-*"):  # left by a killed embed (we hold the lock: none is live)
        shutil.rmtree(stale, ignore_errors=True)
    new = staging_dir(out)
    new.mkdir(parents=True)
    try:
        written, all_ids = _embed_all(ws, cfg, run, checkpoint, encoder, new)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    _swap_in(new, out)

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


def _embed_all(ws: Workspace, cfg: EmbedConfig, run: str, checkpoint: Path, encoder, out: Path
               ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Every processed material through ``encoder``: the tables and indexes written into ``out`` (the index facts
    per table) and every material id."""
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
    return written, all_ids


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
    from cmma_cli.retrieve import next_query_hint

    hint = esc(next_query_hint([name for name in written if name != "unified"]))  # a query this run can answer
    console.print(f"Embedded {materials} materials in {seconds:.1f} s. Next: `{hint}`.",
                  highlight=False, soft_wrap=True)
