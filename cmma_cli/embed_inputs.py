"""``cmma embed --input PATH ...``: embed a user's own materials with a trained run, without retraining.

Inputs, in any mix (folders are searched recursively). Each file goes to the registered modality that
claims it (:meth:`~cmma_cli.modalities.base.Modality.claim_input`: by suffix, or by a table's columns; the
surest claim wins, a tie the first registered), which reads it into processed-like rows with the
preprocess settings ``processed/`` was made with:

- structures: ``.cif`` files, and CSV / Parquet tables with a CIF column, read exactly as
  ``cmma fetch --source local`` reads them (ids, properties, symmetry). They are whole materials: every
  modality of the run computes its columns from them as ``cmma preprocess`` does (the crystal graph and,
  when the run has xrd, the computed pattern), and a file of another modality named like one
  (``a.cif`` + ``a.xy``) is that material's (:meth:`~cmma_cli.modalities.base.Modality.link_inputs`: the
  measured pattern replaces the computed one, as with ``cmma preprocess --xrd-dir``);
- measured XRD patterns: ``.xy``, ``.xye``, ``.dat`` (and ``.txt`` / ``.csv`` files holding two numeric
  columns), id = the file stem;
- images: ``.png``, ``.jpg``, ``.tif`` (runs trained with the image modality), id = the file stem;
- texts: a CSV / Parquet table with a text column and no CIF column; a JSON / JSON-lines file of strings,
  of objects with an id and a text, or of synthesis recipes; a ``.txt`` / ``.md`` prose file.

Everything goes to ``<ws>/embeddings/<run>/inputs/<name>/`` (or ``--out``), never into ``processed/``:
``materials.parquet`` (id, kind, file, formula, crystal system, ...), ``<modality>.parquet``,
``unified.parquet``, an index beside each, ``rejects.parquet`` and ``manifest.json``.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from cmma_cli.config import EmbedConfig
from cmma_cli.console import console
from cmma_cli.errors import CMMAError
from cmma_cli.modalities import REGISTRY, get_modality
from cmma_cli.modalities.base import UserInputs
from cmma_cli.modalities.user_files import is_table, join_or, suffix
from cmma_cli.sources.schema import REJECT_COLUMNS
from cmma_cli.workspace import Workspace, require_stage, write_manifest, write_table

STAGE = "embed-inputs"


def input_kinds() -> str:
    """What ``--input`` takes, in words, from the registry: ``CIF files or folders, ..., images (.png, ...)``."""
    return join_or([m.input_help for m in REGISTRY.values() if m.input_help])


@dataclass
class InputFiles:
    """The user's files sorted by the modality that reads them, and the files no modality reads."""

    files: dict[str, list[Path]] = field(default_factory=dict)  # {modality: its files, in the order given}
    rejects: list[dict[str, str]] = field(default_factory=list)

    def empty(self) -> bool:
        return not any(self.files.values())

    def read(self, config: Any = None) -> dict[str, UserInputs]:
        """``{modality: what it read}``; ``config`` is the :class:`~cmma_cli.config.PreprocessConfig` of
        ``processed/`` (default: the defaults). Whole materials are read first; the other modalities' files
        named like one of them become that material's linked inputs instead of rows of their own."""
        if config is None:
            from cmma_cli.config import PreprocessConfig

            config = PreprocessConfig()
        remaining = {name: list(paths) for name, paths in self.files.items() if paths}
        out: dict[str, UserInputs] = {}
        for name in [n for n in remaining if get_modality(n).whole_materials]:
            got = get_modality(name).read_inputs(remaining.pop(name), getattr(config, name, None))
            ids = set(got.ids)
            for other, paths in list(remaining.items()):
                links = get_modality(other).link_inputs(paths, ids)
                if links:
                    got.linked.setdefault(other, {}).update({mid: value for mid, (_, value) in links.items()})
                    used = {path for path, _ in links.values()}
                    remaining[other] = [p for p in paths if p not in used]
            out[name] = got
        for name, paths in remaining.items():
            if paths:
                out[name] = get_modality(name).read_inputs(paths, getattr(config, name, None))
        return out


def _claim(path: Path) -> str | None:
    """The modality that reads ``path`` (the surest claim, ties to the first registered), or None."""
    best, owner = 0, None
    for modality in REGISTRY.values():
        claim = modality.claim_input(path)
        if claim > best:
            best, owner = claim, modality.name
    return owner


def _add_file(path: Path, found: InputFiles, explicit: bool) -> None:
    owner = _claim(path)
    if owner is not None:
        found.files.setdefault(owner, []).append(path)
    elif is_table(path):
        columns = [m.input_columns for m in REGISTRY.values() if m.input_columns]
        which = [f"{what} column ({', '.join(names)})" for what, names in columns]
        has = "neither a " + " nor a ".join(which) if len(which) > 1 else "no " + (which[0] if which else "usable column")
        held = join_or([f"the {what}s" for what, _ in columns]) or "the data"
        raise CMMAError(f"The table {path} has {has}: name the column that holds {held}.")
    elif explicit:
        raise CMMAError(f"Don't know how to embed {path}: give {input_kinds()}.")
    else:
        found.rejects.append({"source": "input", "item": str(path),
                              "reason": f"unsupported file type {suffix(path) or '(none)'}"})


def collect_inputs(paths: list[str | Path]) -> InputFiles:
    """Sort the ``--input`` paths (files and folders) by the modality that reads them."""
    if not paths:
        raise CMMAError(f"Nothing to embed: give --input {input_kinds()}.")
    found = InputFiles()
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise CMMAError(f"{path} does not exist: check the path given to --input.")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not files:
                raise CMMAError(f"The folder {path} given to --input holds no files.")
            for file in files:
                _add_file(file, found, explicit=False)
        else:
            _add_file(path, found, explicit=True)
    if found.empty():
        raise CMMAError(f"None of the --input files could be used (see the rejects): give {input_kinds()}.")
    return found


@dataclass
class _Embedded:
    """What the inputs became: ``{modality: (ids, vectors)}``, one row per input for materials.parquet, rejects."""

    dim: int
    parts: dict[str, tuple[list[str], np.ndarray]] = field(default_factory=dict)
    materials: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, str]] = field(default_factory=list)

    def add(self, modality: str, ids: list[str], vectors: np.ndarray) -> None:
        old_ids, old = self.parts.get(modality, ([], np.zeros((0, self.dim), np.float32)))
        self.parts[modality] = (old_ids + list(ids), np.concatenate([old, vectors]))


def _default_name(paths: list[str | Path], root: Path) -> str:
    stem = Path(str(paths[0])).expanduser().name.split(".")[0] or "inputs"
    name, n = stem, 2
    while (root / name).exists() and not (root / name / "manifest.json").exists():
        name, n = f"{stem}-{n}", n + 1
    return name


def embed_inputs(ws: Workspace, cfg: EmbedConfig, paths: list[str | Path], out: Path | None = None,
                 name: str | None = None) -> dict[str, Any]:
    """Embed the user's ``paths`` with a trained run (no retraining); returns the manifest of the output folder."""
    from cmma_cli.embed import check_config, resolve_checkpoint
    from cmma_cli.embeddings import UNIFIED, clear_stage, unify, write_embeddings
    from cmma_cli.encode import Encoder

    check_config(cfg)
    processed = require_stage(ws.processed, "preprocess")
    run, _, checkpoint = resolve_checkpoint(ws, cfg.run, cfg.checkpoint)
    found = collect_inputs(paths)
    root = ws.embeddings_dir(run) / "inputs"
    out = Path(out).expanduser().resolve() if out is not None else root / (name or _default_name(paths, root))
    if out.resolve() in (ws.processed.resolve(), ws.embeddings_dir(run).resolve()):
        raise CMMAError(f"--out {out} would overwrite a stage's output: pass a new folder.")
    started = time.perf_counter()
    encoder = Encoder(checkpoint, processed, cache_dir=ws.cache, device=cfg.device,
                      batch_size=cfg.batch_size, workers=cfg.workers)
    for modality in found.files:  # a CIF is usable by a run with the structure or the xrd encoder
        if not any(source in encoder.modalities for source in get_modality(modality).query_sources()):
            encoder.require(modality, run)
    inputs = found.read(encoder.preprocess)
    if not any(got.ids for got in inputs.values()):
        raise CMMAError(f"None of the --input files could be used (see the rejects): give {input_kinds()}.")
    batch = _Embedded(encoder.dim, rejects=list(found.rejects))
    for modality, got in inputs.items():
        table, rejects = encoder.rows(get_modality(modality), got)
        batch.rejects += got.rejects + rejects
        for name_, (ids, vectors) in encoder.embed_new(table).items():
            batch.add(name_, ids, vectors)
        batch.materials += got.materials
    parts = {m: batch.parts[m] for m in encoder.modalities if m in batch.parts}  # the run's order
    materials, rejects = batch.materials, batch.rejects
    for modality, (ids, _) in parts.items():
        repeated = sorted(m for m, n in Counter(ids).items() if n > 1)
        if repeated:
            raise CMMAError(f"The {modality} inputs repeat the ids {', '.join(repeated[:5])}: give each input its own "
                            "id (file name or id column).")
    clear_stage(out)
    written = {}
    for modality, (ids, vectors) in parts.items():
        written[modality] = write_embeddings(out, modality, {"material_id": pa.array(ids, pa.string())}, vectors, cfg)
    all_ids = list(dict.fromkeys(m for ids, _ in parts.values() for m in ids))
    uid, unified, used_modalities = unify(all_ids, parts)
    written[UNIFIED] = write_embeddings(out, UNIFIED, {"material_id": pa.array(uid, pa.string()),
                                                       "modalities": pa.array(used_modalities, pa.list_(pa.string()))},
                                        unified, cfg)
    embedded = set(all_ids)
    write_table(pd.DataFrame([r for r in materials if r["material_id"] in embedded]), out / "materials.parquet")
    write_table(pd.DataFrame(rejects, columns=REJECT_COLUMNS).astype(str), out / "rejects.parquet")
    counts = {k: v["rows"] for k, v in written.items()}
    seconds = time.perf_counter() - started
    manifest = write_manifest(
        out, STAGE, {"run": run, "checkpoint": str(checkpoint), "inputs": [str(Path(p).resolve()) for p in paths]},
        inputs=[ws.processed], rows={**counts, "rejects": len(rejects)},
        extra={"run": run, "checkpoint": {"path": ws.portable(checkpoint), "epoch": encoder.checkpoint.get("epoch")},
               "dim": encoder.dim, "modalities": sorted(parts), "counts": counts, "seconds": round(seconds, 2)},
    )
    detail = ", ".join(f"{v} {k}" for k, v in counts.items())
    tail = f"; {len(rejects)} rejects in rejects.parquet." if rejects else "."
    console.print(f"Embedded {len(all_ids)} new inputs ({detail}) with run {run} in {seconds:.1f} s -> {out}{tail}",
                  highlight=False, soft_wrap=True)
    return manifest
