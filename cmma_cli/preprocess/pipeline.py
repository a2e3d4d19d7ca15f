"""``cmma preprocess``: ``raw/`` -> ``processed/materials.parquet``, ``splits.parquet``, ``rejects.parquet``.

The stage itself: check the options and the input, skip when up to date, gather the small inputs
(recipe texts, descriptions, user folders) in this process, stream the structures through
:mod:`~cmma_cli.preprocess.stream`, then write splits, rejects, the manifest and a summary. See
:mod:`cmma_cli.preprocess` for the output schema.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pymatgen.analysis.diffraction.xrd import WAVELENGTHS
from rich.table import Table

from cmma_cli.config import PreprocessConfig, as_dict
from cmma_cli.console import console, progress
from cmma_cli.errors import CMMAError
from cmma_cli.preprocess.featurize import FeaturizeOptions
from cmma_cli.preprocess.inputs import (
    IMAGE_SUFFIXES,
    PATTERN_SUFFIXES,
    folder_fingerprint,
    image_problem,
    scan_keyed_folder,
)
from cmma_cli.preprocess.spectra import XRDGrid
from cmma_cli.preprocess.splits import GROUPINGS, SPLITS, assign_splits
from cmma_cli.preprocess.stream import (
    MODALITY_COLUMNS,
    MODALITY_FIELDS,
    LinkedData,
    ParquetStream,
    Tally,
    featurized_chunks,
    modality_table,
    raw_chunks,
    worker_pool,
)
from cmma_cli.preprocess.text import compose_procedure, normalize_text
from cmma_cli.sources.schema import MATERIAL_COLUMNS, REJECT_COLUMNS
from cmma_cli.workspace import (
    Workspace,
    begin_stage,
    is_up_to_date,
    read_manifest,
    read_table,
    require_stage,
    write_manifest,
    write_table,
)

STAGE = "preprocess"
MATERIALS = "materials.parquet"
SPLITS_FILE = "splits.parquet"
REJECTS_FILE = "rejects.parquet"

# ----------------------------------------------------------------------------------------- config


def validate(cfg: PreprocessConfig) -> XRDGrid:
    """Check every option; one sentence per mistake. Returns the XRD grid the config describes."""
    if not cfg.cutoff > 0:
        raise CMMAError(f"--cutoff must be a positive distance in Angstrom, not {cfg.cutoff}.")
    if not 0 <= cfg.min_distance < cfg.cutoff:
        raise CMMAError(
            f"--min-distance must be at least 0 and below the cutoff ({cfg.cutoff} A), not {cfg.min_distance}."
        )
    for name in ("max_neighbors", "max_sites", "workers"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise CMMAError(f"--{name.replace('_', '-')} must be at least 1 (or left out), not {value}.")
    if not 1 <= cfg.chunk_size <= 100_000:  # list offsets are int32: keep a chunk's values below 2**31
        raise CMMAError(f"--chunk-size must be between 1 and 100000 materials, not {cfg.chunk_size}.")
    if cfg.wavelength not in WAVELENGTHS:
        raise CMMAError(f"--wavelength {cfg.wavelength!r} is not known: use one of {', '.join(sorted(WAVELENGTHS))}.")
    if cfg.split_by not in GROUPINGS:
        raise CMMAError(f"--split-by must be one of {', '.join(GROUPINGS)}, not {cfg.split_by!r}.")
    if not (0 <= cfg.val_fraction < 1 and 0 <= cfg.test_fraction < 1 and cfg.val_fraction + cfg.test_fraction < 1):
        raise CMMAError("--val-fraction and --test-fraction must each be in [0, 1) and sum to less than 1.")
    for option, value in (("--xrd-dir", cfg.xrd_dir), ("--image-dir", cfg.image_dir)):
        if value and not _folder(value).is_dir():
            raise CMMAError(
                f"The folder {value} given to {option} does not exist: pass a folder of <material_id> files."
            )
    try:
        return XRDGrid(cfg.two_theta_min, cfg.two_theta_max, cfg.two_theta_step, cfg.xrd_fwhm, cfg.wavelength)
    except ValueError as exc:
        raise CMMAError(f"The XRD grid options are inconsistent: {exc}.") from None


#: With ``--workers`` left out, each worker process gets at least this many materials (a pool takes
#: a second or two to start, which a small input does not repay).
MIN_PER_WORKER = 200


def default_workers(materials: int) -> int:
    """All cores, but no more processes than ``materials / MIN_PER_WORKER`` (at least one)."""
    return max(1, min(os.cpu_count() or 1, materials // MIN_PER_WORKER))


def _folder(value: str | None) -> Path | None:
    return Path(value).expanduser().resolve() if value else None


def stage_config(cfg: PreprocessConfig) -> dict[str, Any]:
    """What decides the output (recorded in the manifest): the config less ``workers`` and ``chunk_size``,
    with folders made absolute and their contents fingerprinted, so a changed folder reruns the stage."""
    config = as_dict(cfg)
    config.pop("workers")
    config.pop("chunk_size")
    for key in ("xrd_dir", "image_dir"):
        folder = _folder(config[key])
        config[key] = str(folder) if folder else None
        if folder:
            config[f"{key}_contents"] = folder_fingerprint(folder)
    return config


# ------------------------------------------------------------------------------------------- text


def _synthesis_texts(raw_dir: Path, ids: set[str], rejects: list[dict]) -> dict[str, tuple[list[str], list[str]]]:
    """``{material_id: (texts, recipe_ids)}``: one composed text per linked recipe, ``mp_id`` links first."""
    path = raw_dir / "synthesis.parquet"
    if not path.exists():
        return {}
    links = read_table(
        path, columns=["recipe_id", "material_id", "link_method", "synthesis_type", "target_formula", "record"]
    )
    if links.empty:
        return {}
    links = links.assign(_rank=(links["link_method"] != "mp_id").astype(int)).sort_values(
        ["material_id", "_rank"], kind="stable"
    )
    composed: dict[str, str | None] = {}
    out: dict[str, tuple[list[str], list[str]]] = {}
    for row in links.itertuples(index=False):
        mid, rid = str(row.material_id), str(row.recipe_id)
        if mid not in ids:
            rejects.append(
                {
                    "source": "synthesis",
                    "item": rid,
                    "reason": f"linked to {mid}, which is not in raw/materials.parquet",
                }
            )
            continue
        if rid not in composed:
            try:
                record = json.loads(row.record) if isinstance(row.record, str) else row.record
                if not isinstance(record, dict):
                    raise TypeError("the record is not a JSON object")
                text = compose_procedure(record, row.synthesis_type, row.target_formula)
            except (ValueError, TypeError, AttributeError) as exc:
                rejects.append({"source": "synthesis", "item": rid, "reason": f"unreadable recipe record ({exc})"})
                text = None
            composed[rid] = text
        text = composed[rid]
        if text is None:
            continue
        texts, rids = out.setdefault(mid, ([], []))
        if rid not in rids:
            texts.append(text)
            rids.append(rid)
    return out


def _descriptions(raw_dir: Path) -> dict[str, str]:
    """``{material_id: description}``, normalised; the first non-empty one where a material has several."""
    path = raw_dir / "descriptions.parquet"
    if not path.exists():
        return {}
    table = read_table(path, columns=["material_id", "description"])
    out: dict[str, str] = {}
    for mid, text in zip(table["material_id"], table["description"]):
        if mid not in out and isinstance(text, str):
            clean = normalize_text(text)
            if clean:
                out[str(mid)] = clean
    return out


def _images(image_dir: Path | None, ids: set[str], rejects: list[dict]) -> dict[str, str]:
    if image_dir is None:
        return {}
    found, bad = scan_keyed_folder(image_dir, IMAGE_SUFFIXES, ids, "image", "--image-dir")
    rejects.extend(bad)
    images = {}
    for mid, path in found.items():
        problem = image_problem(path)
        if problem:
            rejects.append({"source": "image", "item": str(path), "reason": problem})
        else:
            images[mid] = str(path)
    return images


# ------------------------------------------------------------------------------------------- stage


def run_preprocess(ws: Workspace, cfg: PreprocessConfig, force: bool = False) -> dict[str, Any]:
    """Build ``processed/`` from ``raw/`` (or skip when it is up to date); returns the stage manifest."""
    require_stage(ws.raw, "fetch")
    grid = validate(cfg)
    raw_materials = ws.raw / MATERIALS
    if not raw_materials.exists():
        raise CMMAError(f"{raw_materials} is missing although fetch finished: run `cmma fetch --force`.")
    raw_file = pq.ParquetFile(raw_materials)
    total = raw_file.metadata.num_rows
    if total == 0:
        raise CMMAError(
            f"{raw_materials} holds no materials: run `cmma fetch` with a source that yields some "
            "(e.g. `cmma fetch --source sample --force`)."
        )
    config = stage_config(cfg)
    if not force and is_up_to_date(ws.processed, config, [ws.raw]):
        console.print(
            f"processed/ in {ws.root} is up to date with raw/ and this config: skipped (use --force to redo)."
        )
        return read_manifest(ws.processed)

    started = time.perf_counter()
    workers = cfg.workers or default_workers(total)
    begin_stage(ws.processed)
    rejects: list[dict] = []
    identity = pq.read_table(raw_materials, columns=["material_id", "formula", "elements"]).to_pandas()
    identity["material_id"] = identity["material_id"].astype(str)
    identity = identity.drop_duplicates("material_id", keep="first").reset_index(drop=True)
    ids = set(identity["material_id"])

    with console.status("Composing synthesis texts and reading descriptions..."):
        texts = LinkedData(
            _synthesis_texts(ws.raw, ids, rejects), _descriptions(ws.raw), _images(_folder(cfg.image_dir), ids, rejects)
        )
    measured: dict[str, Path] = {}
    xrd_dir = _folder(cfg.xrd_dir)
    if xrd_dir is not None:
        measured, bad = scan_keyed_folder(xrd_dir, PATTERN_SUFFIXES, ids, "measured_xrd", "--xrd-dir")
        rejects.extend(bad)

    options = FeaturizeOptions(cfg.cutoff, cfg.max_neighbors, cfg.min_distance, cfg.max_sites, cfg.xrd, grid)
    base_schema = raw_file.schema_arrow.remove(raw_file.schema_arrow.get_field_index("structure"))
    schema = pa.schema(list(base_schema) + MODALITY_FIELDS)
    properties = [name for name in base_schema.names if name not in MATERIAL_COLUMNS]
    tally = Tally()
    out = ParquetStream(ws.processed / MATERIALS, schema)
    try:
        with worker_pool(workers, options) as pool, progress() as bar:
            task = bar.add_task(f"Graphs + XRD ({workers} worker{'s' * (workers > 1)})", total=len(ids))
            chunks = raw_chunks(raw_materials, cfg.chunk_size, measured, rejects)
            for base, results in featurized_chunks(chunks, options, pool, workers, lambda n: bar.advance(task, n)):
                table = modality_table(base, results, texts).cast(schema)
                out.write(table)
                tally.add(table, results)
        out.close()
    except BaseException:
        out.abort()
        raise

    splits = assign_splits(identity, cfg.val_fraction, cfg.test_fraction, cfg.seed, cfg.split_by)
    write_table(splits, ws.processed / SPLITS_FILE)
    rejects.extend(tally.rejects)
    write_table(pd.DataFrame(rejects, columns=REJECT_COLUMNS).astype(str), ws.processed / REJECTS_FILE)

    flags = pd.concat(tally.flags, ignore_index=True).merge(splits[["material_id", "split"]], on="material_id")
    modalities = {name: int(flags[name].sum()) for name in MODALITY_COLUMNS}
    modalities["xrd_measured"] = tally.measured_xrd
    split_counts = {s: int((splits["split"] == s).sum()) for s in SPLITS}
    reject_counts = pd.Series([r["source"] for r in rejects], dtype=object).value_counts().to_dict()
    seconds = time.perf_counter() - started
    manifest = write_manifest(
        ws.processed,
        STAGE,
        config,
        inputs=[ws.raw],
        rows={"materials": tally.materials, "splits": len(splits), "rejects": len(rejects)},
        extra={
            "xrd_grid": grid.describe(),
            "properties": properties,
            "modalities": modalities,
            "splits": split_counts,
            "split_by": cfg.split_by,
            "rejects": {str(k): int(v) for k, v in reject_counts.items()},
            "graphs": {
                "edges": tally.edges,
                "mean_edges_per_structure": round(tally.edges / max(1, modalities["structure"]), 1),
                "materials_with_isolated_atoms": tally.with_isolated,
            },
            "run": {"workers": workers, "seconds": round(seconds, 2)},
        },
    )
    _summary(ws, flags, tally, rejects, reject_counts, seconds, len(ids))
    return manifest


def _summary(ws: Workspace, flags: pd.DataFrame, tally: Tally, rejects, reject_counts, seconds: float, n: int) -> None:
    table = Table(title=f"processed/ in {ws.root}: materials per split and modality", title_justify="left")
    table.add_column("split")
    table.add_column("materials", justify="right")
    for name in MODALITY_COLUMNS:
        table.add_column(name, justify="right")
    for split in (*SPLITS, "all"):
        part = flags if split == "all" else flags[flags["split"] == split]
        table.add_row(split, str(len(part)), *(str(int(part[name].sum())) for name in MODALITY_COLUMNS))
    console.print(table)
    if tally.measured_xrd:
        console.print(f"{tally.measured_xrd} XRD patterns are measured (the rest computed).")
    if tally.with_isolated:
        console.print(
            f"{tally.with_isolated} structures have atoms with no neighbour within the cutoff; they stay as nodes "
            "without edges (raise --cutoff to connect them)."
        )
    for split in SPLITS:
        if not (flags["split"] == split).any():
            console.print(f"[yellow]The {split} split is empty[/]: too few distinct groups for the fractions asked.")
    if rejects:
        detail = ", ".join(f"{v} {k}" for k, v in reject_counts.items())
        console.print(f"{len(rejects)} rejects ({detail}), reasons in {ws.processed / REJECTS_FILE}.")
    console.print(f"Preprocessed {n} materials in {seconds:.1f} s ({n / max(seconds, 1e-9):.0f} materials/s).")
