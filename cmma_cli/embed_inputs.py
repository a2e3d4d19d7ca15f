"""``cmma embed --input PATH ...``: embed a user's own materials with a trained run, without retraining.

Inputs, in any mix (folders are searched recursively and sorted by suffix):

- structures: ``.cif`` files, and CSV / Parquet tables with a CIF column, read exactly as
  ``cmma fetch --source local`` reads them (ids, properties, symmetry). Each structure is embedded by
  the structure encoder, and its computed XRD pattern by the XRD encoder when the run has one;
- measured XRD patterns: ``.xy``, ``.xye``, ``.dat`` (and ``.txt`` / ``.csv`` files holding two numeric
  columns), id = the file stem. A pattern named like a CIF (``a.cif`` + ``a.xy``) becomes that
  structure's pattern instead of the computed one, as in ``cmma preprocess --xrd-dir``;
- images: ``.png``, ``.jpg``, ``.tif`` (runs trained with the image modality), id = the file stem;
- texts: a CSV / Parquet table with a text column (``text``, ``description``, ``procedure``,
  ``synthesis``) and no CIF column; a JSON / JSON-lines file of strings, of ``{"id", "text"}`` objects,
  or of synthesis recipes (composed into one procedure text, as ``cmma preprocess`` does); a ``.txt`` /
  ``.md`` prose file (one text, id = the stem).

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
from cmma_cli.preprocess.inputs import IMAGE_SUFFIXES
from cmma_cli.preprocess.spectra import PatternRejected, read_two_columns
from cmma_cli.preprocess.text import compose_procedure, normalize_text
from cmma_cli.sources.schema import REJECT_COLUMNS
from cmma_cli.workspace import Workspace, require_stage, write_manifest, write_table

STAGE = "embed-inputs"
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")
JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")
PATTERN_ONLY = (".xy", ".xye", ".dat")
PROSE_SUFFIXES = (".txt", ".md")
CIF_COLUMNS = ("cif", "structure", "cif_string")
TEXT_COLUMNS = ("text", "description", "procedure", "synthesis", "synthesis_text")
ID_COLUMNS = ("material_id", "mp_id", "id", "name")


@dataclass
class InputFiles:
    """The user's inputs sorted by kind."""

    structures: list[Path] = field(default_factory=list)  # .cif files and tables with a CIF column
    patterns: list[tuple[str, Path]] = field(default_factory=list)
    images: list[tuple[str, Path]] = field(default_factory=list)
    texts: list[tuple[str, str, str]] = field(default_factory=list)  # (id, clean text, file)
    rejects: list[dict[str, str]] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.structures or self.patterns or self.images or self.texts)


def _suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".xz"):
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _pick(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    lower = {str(c).lower(): c for c in columns}
    return next((lower[c] for c in candidates if c in lower), None)


def _read_table(path: Path) -> pd.DataFrame:
    try:
        if _suffix(path) in (".parquet", ".pq"):
            return pd.read_parquet(path)
        return pd.read_csv(path, sep="\t" if _suffix(path) == ".tsv" else ",")
    except Exception as exc:
        raise CMMAError(f"Could not read the table {path} ({type(exc).__name__}): check that it is a valid CSV or "
                        "Parquet file.") from None


def _is_pattern(path: Path) -> bool:
    try:
        read_two_columns(path)
        return True
    except (PatternRejected, OSError, UnicodeError):
        return False


def _text_record(record: Any, default_id: str) -> tuple[str, str] | None:
    """``(id, clean text)`` from a JSON item: a string, ``{"id", "text"}``, or a synthesis recipe."""
    if isinstance(record, str):
        return default_id, normalize_text(record)
    if not isinstance(record, dict):
        return None
    mid = next((str(record[k]) for k in ID_COLUMNS if record.get(k) not in (None, "")), default_id)
    text_key = next((k for k in TEXT_COLUMNS if isinstance(record.get(k), str)), None)
    if text_key is not None:
        return mid, normalize_text(record[text_key])
    if record.get("operations") is not None or record.get("precursors") is not None or record.get("target") is not None:
        from cmma_cli.sources.recipes import recipe_id

        rid = next((str(record[k]) for k in ID_COLUMNS if record.get(k) not in (None, "")), recipe_id(record))
        return rid, compose_procedure(record, record.get("synthesis_type"))
    return None


def _add_json(path: Path, found: InputFiles) -> None:
    from cmma_cli.sources.recipes import read_recipe_file

    try:
        records = read_recipe_file(path)
    except (OSError, ValueError, EOFError) as exc:
        raise CMMAError(f"Could not read {path} ({exc}): give a JSON list, JSON lines, or {{\"reactions\": [...]}}.") from None
    for i, record in enumerate(records):
        item = _text_record(record, f"{path.name.split('.')[0]}-{i}")
        if item is None or not item[1]:
            found.rejects.append({"source": "text", "item": f"{path}:{i}", "reason": "no text, id/text object or recipe"})
        else:
            found.texts.append((item[0], item[1], str(path)))


def _add_table(path: Path, found: InputFiles) -> None:
    frame = _read_table(path)
    columns = list(frame.columns)
    if _pick(columns, CIF_COLUMNS):
        found.structures.append(path)
        return
    text_col = _pick(columns, TEXT_COLUMNS)
    if text_col is None:
        if _is_pattern(path):
            found.patterns.append((path.stem, path))
            return
        raise CMMAError(f"The table {path} has neither a CIF column ({', '.join(CIF_COLUMNS)}) nor a text column "
                        f"({', '.join(TEXT_COLUMNS)}): name the column that holds the CIFs or the texts.")
    id_col = _pick(columns, ID_COLUMNS)
    for i, row in enumerate(frame.to_dict("records")):
        text = row[text_col]
        mid = str(row[id_col]) if id_col is not None and pd.notna(row[id_col]) else f"{path.stem}-{i}"
        clean = normalize_text(text) if isinstance(text, str) else ""
        if clean:
            found.texts.append((mid, clean, str(path)))
        else:
            found.rejects.append({"source": "text", "item": f"{path}:{i}", "reason": "empty text"})


def _add_file(path: Path, found: InputFiles, explicit: bool) -> None:
    suffix = _suffix(path)
    if suffix == ".cif":
        found.structures.append(path)
    elif suffix in PATTERN_ONLY:
        found.patterns.append((path.stem, path))
    elif suffix in IMAGE_SUFFIXES:
        found.images.append((path.stem, path))
    elif suffix in TABLE_SUFFIXES:
        _add_table(path, found)
    elif suffix in JSON_SUFFIXES:
        _add_json(path, found)
    elif suffix in PROSE_SUFFIXES:
        if _is_pattern(path):
            found.patterns.append((path.stem, path))
            return
        text = normalize_text(path.read_text(errors="replace"))
        if text:
            found.texts.append((path.stem, text, str(path)))
        else:
            found.rejects.append({"source": "text", "item": str(path), "reason": "empty text file"})
    elif explicit:
        raise CMMAError(f"Don't know how to embed {path}: give .cif files, a table with a CIF or text column, "
                        "pattern files (.xy, .xye, .dat), images (.png, .jpg, .tif) or texts (.txt, .json).")
    else:
        found.rejects.append({"source": "input", "item": str(path), "reason": f"unsupported file type {suffix or '(none)'}"})


def collect_inputs(paths: list[str | Path]) -> InputFiles:
    """Sort the ``--input`` paths (files and folders) into structures, patterns, images and texts."""
    if not paths:
        raise CMMAError("Nothing to embed: give --input a CIF file or folder, a table, pattern files or a text file.")
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
        raise CMMAError("None of the --input files could be used (see the rejects): give CIFs, patterns, images or texts.")
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


def _embed_structures(encoder, found: InputFiles, processed: dict[str, Any], run: str, batch: _Embedded) -> None:
    """CIFs and CIF tables, read as ``cmma fetch --source local`` reads them, featurized as preprocess does."""
    from cmma_cli.encode import featurize_options, structure_inputs
    from cmma_cli.sources.local import load_local

    if "structure" not in encoder.modalities and "xrd" not in encoder.modalities:
        encoder.require("structure", run)
    raw = load_local([str(p) for p in found.structures])
    batch.rejects += raw.rejects
    measured = dict(found.patterns)
    ids = raw.materials["material_id"].astype(str).tolist()
    used = {m for m in ids if m in measured}
    options = featurize_options(processed, xrd="xrd" in encoder.modalities)
    items = [(m, s, str(measured[m]) if m in used else None) for m, s in zip(ids, raw.materials["structure"])]
    new = structure_inputs(items, options)
    batch.rejects += new.rejects
    for modality, (vec_ids, vectors) in encoder.embed_new(new.table).items():
        batch.add(modality, vec_ids, vectors)
    keep = [c for c in raw.materials.columns if c not in ("structure", "elements")]
    files = {f"local:{p.name}": str(p.resolve()) for p in found.structures}  # load_local's source names
    for row in raw.materials[keep].to_dict("records"):
        source = row.pop("source", None)
        batch.materials.append({**row, "kind": "structure", "file": files.get(source, source)})
    found.patterns = [(m, p) for m, p in found.patterns if m not in used]  # became structures' patterns


def _embed_files(encoder, modality: str, kind: str, new, items: list[tuple[str, Path]], batch: _Embedded) -> None:
    """Pattern or image files (already read into ``new``) through their encoder."""
    batch.rejects += new.rejects
    ids = new.table.column("material_id").to_pylist()
    rows, vectors = encoder.embed_table(modality, new.table)
    batch.add(modality, [ids[int(r)] for r in rows], vectors)
    files = dict(items)
    batch.materials += [{"material_id": m, "kind": kind, "file": str(files[m])} for m in ids]


def _default_name(paths: list[str | Path], root: Path) -> str:
    stem = Path(str(paths[0])).expanduser().name.split(".")[0] or "inputs"
    name, n = stem, 2
    while (root / name).exists() and not (root / name / "manifest.json").exists():
        name, n = f"{stem}-{n}", n + 1
    return name


def embed_inputs(ws: Workspace, cfg: EmbedConfig, paths: list[str | Path], out: Path | None = None,
                 name: str | None = None) -> dict[str, Any]:
    """Embed the user's ``paths`` with a trained run (no retraining); returns the manifest of the output folder."""
    from cmma_cli.embed import check_config, clear_stage, resolve_checkpoint, unify, write_embeddings
    from cmma_cli.encode import Encoder, image_inputs, pattern_inputs, xrd_grid

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
    batch = _Embedded(encoder.dim, rejects=list(found.rejects))
    if found.structures:
        _embed_structures(encoder, found, processed, run, batch)
    if found.patterns:
        encoder.require("xrd", run)
        _embed_files(encoder, "xrd", "pattern", pattern_inputs(found.patterns, xrd_grid(processed)), found.patterns, batch)
    if found.images:
        encoder.require("image", run)
        _embed_files(encoder, "image", "image", image_inputs(found.images), found.images, batch)
    if found.texts:
        encoder.require("text", run)
        batch.add("text", [t[0] for t in found.texts], encoder.embed_texts([t[1] for t in found.texts]))
        batch.materials += [{"material_id": m, "kind": "text", "file": f, "text": t} for m, t, f in found.texts]
    parts, materials, rejects = batch.parts, batch.materials, batch.rejects
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
    written["unified"] = write_embeddings(out, "unified", {"material_id": pa.array(uid, pa.string()),
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
