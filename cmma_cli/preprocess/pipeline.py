"""``cmma preprocess``: ``raw/`` -> ``processed/materials.parquet``, ``splits.parquet``, ``rejects.parquet``,
``recipes.parquet``.

The stage itself: check the options and the input, skip when up to date, let each modality gather what
it links to the materials (recipe texts, descriptions, user folders) in this process, stream the structures through
:mod:`~cmma_cli.preprocess.stream`, then write splits, rejects, the manifest and a summary. See
:mod:`cmma_cli.preprocess` for the output schema.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from rich.table import Table

from cmma_cli.config import PreprocessConfig, as_dict, validate as validate_settings
from cmma_cli.console import console, esc, progress
from cmma_cli.errors import CMMAError
from cmma_cli.modalities import REGISTRY
from cmma_cli.modalities.base import GatherContext
from cmma_cli.preprocess.inputs import folder_fingerprint
from cmma_cli.preprocess.recipes import RECIPES_FILE, recipe_rows
from cmma_cli.preprocess.splits import SPLITS, assign_splits
from cmma_cli.preprocess.stream import Tally, clear_non_finite, featurized_chunks, modality_fields, modality_table, raw_chunks, worker_pool
from cmma_cli.sources.schema import MATERIAL_COLUMNS, REJECT_COLUMNS, STRUCTURE_COLUMN
from cmma_cli.workspace import (
    ParquetStream,
    Workspace,
    begin_stage,
    is_up_to_date,
    read_manifest,
    require_stage,
    write_manifest,
    write_arrow,
    write_table,
)

STAGE = "preprocess"
MATERIALS = "materials.parquet"
SPLITS_FILE = "splits.parquet"
REJECTS_FILE = "rejects.parquet"

# ----------------------------------------------------------------------------------------- config


def validate(cfg: PreprocessConfig) -> None:
    """Check every option, the stage's own and each modality's; one sentence per mistake."""
    validate_settings(cfg)
    for name in ("max_sites", "max_reflections", "workers"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise CMMAError(f"--{name.replace('_', '-')} must be at least 1 (or left out), not {value}.")
    if cfg.max_volume is not None and not cfg.max_volume > 0:
        raise CMMAError(f"--max-volume must be a positive volume in cubic Angstrom (or left out), not {cfg.max_volume}.")
    if not 1 <= cfg.chunk_size <= 100_000:  # list offsets are int32: keep a chunk's values below 2**31
        raise CMMAError(f"--chunk-size must be between 1 and 100000 materials, not {cfg.chunk_size}.")
    if not (0 <= cfg.val_fraction < 1 and 0 <= cfg.test_fraction < 1 and cfg.val_fraction + cfg.test_fraction < 1):
        raise CMMAError("--val-fraction and --test-fraction must each be in [0, 1) and sum to less than 1.")
    for name, modality in REGISTRY.items():
        modality.check(getattr(cfg, name, None))


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
    with each modality's folders made absolute and their contents fingerprinted, so a changed folder reruns,
    and the processed column layout, so a ``processed/`` made before a modality gained a column reruns."""
    config = as_dict(cfg)
    config.pop("workers")
    config.pop("chunk_size")
    config["columns"] = [f.name for modality in REGISTRY.values() for f in modality.fields]
    for name, modality in REGISTRY.items():
        for key, value in modality.folders(getattr(cfg, name, None)).items():
            folder = _folder(value)
            config[name][key] = str(folder) if folder else None
            if folder:
                config[name][f"{key}_contents"] = folder_fingerprint(folder)
    return config


# ------------------------------------------------------------------------------------------- stage


def run_preprocess(ws: Workspace, cfg: PreprocessConfig, force: bool = False) -> dict[str, Any]:
    """Build ``processed/`` from ``raw/`` (or skip when it is up to date); returns the stage manifest."""
    require_stage(ws.raw, "fetch")
    validate(cfg)
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
            f"processed/ in {esc(ws.root)} is up to date with raw/ and this config: skipped (use --force to redo)."
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

    modalities = list(REGISTRY.values())
    gather = GatherContext(ws.raw, ids, rejects)
    with console.status("Reading what each modality links to the materials (texts, user folders)..."):
        linked = {m.name: m.gather(getattr(cfg, m.name, None), gather) for m in modalities}

    base_schema = raw_file.schema_arrow.remove(raw_file.schema_arrow.get_field_index(STRUCTURE_COLUMN))
    schema = pa.schema(list(base_schema) + modality_fields(modalities))
    properties = [name for name in base_schema.names if name not in MATERIAL_COLUMNS]
    tally = Tally(modalities)
    out = ParquetStream(ws.processed / MATERIALS, schema)
    non_finite: dict[str, int] = {}
    try:
        with worker_pool(workers, cfg, modalities) as pool, progress() as bar:
            task = bar.add_task(f"Featurizing ({workers} worker{'s' * (workers > 1)})", total=len(ids))
            chunks = raw_chunks(raw_materials, cfg.chunk_size, linked, rejects)
            for base, results in featurized_chunks(chunks, cfg, modalities, pool, workers, lambda n: bar.advance(task, n)):
                table = modality_table(clear_non_finite(base, non_finite), results, modalities).cast(schema)
                out.write(table)
                tally.add(table, results)
        out.close()
    except BaseException:
        out.abort()
        raise

    splits = assign_splits(identity, cfg.val_fraction, cfg.test_fraction, cfg.seed, cfg.split_by)
    fallback = bool(splits.attrs.get("fallback"))
    write_table(splits, ws.processed / SPLITS_FILE)
    rejects.extend(tally.rejects)
    with console.status("Keeping every synthesis recipe as a row of its own (text and target composition)..."):
        recipe_table, recipe_counts = recipe_rows(ws.raw, cfg, modalities, splits, rejects)
    if recipe_table is not None:
        write_arrow(recipe_table, ws.processed / RECIPES_FILE)
    else:
        (ws.processed / RECIPES_FILE).unlink(missing_ok=True)
    write_table(pd.DataFrame(rejects, columns=REJECT_COLUMNS).astype(str), ws.processed / REJECTS_FILE)

    flags = pd.concat(tally.flags, ignore_index=True).merge(splits[["material_id", "split"]], on="material_id")
    counted = {label: int(flags[label].sum()) for label in tally.labels()}
    facts: dict[str, Any] = {}
    for name, modality in REGISTRY.items():
        facts.update(modality.facts(getattr(cfg, name, None)))
    for key, part in tally.counts.items():  # modality tallies: "modalities" adds to the counts above
        (counted if key == "modalities" else facts.setdefault(key, {})).update(part)
    split_counts = {s: int((splits["split"] == s).sum()) for s in SPLITS}
    reject_counts = pd.Series([r["source"] for r in rejects], dtype=object).value_counts().to_dict()
    seconds = time.perf_counter() - started
    manifest = write_manifest(
        ws.processed,
        STAGE,
        config,
        inputs=[ws.raw],
        rows={"materials": tally.materials, "splits": len(splits), "rejects": len(rejects),
              "recipes": recipe_table.num_rows if recipe_table is not None else 0},
        extra={
            "recipes": recipe_counts,
            **facts,
            "properties": properties,
            "modalities": counted,
            "splits": split_counts,
            "split_by": "material" if fallback else cfg.split_by,
            **({"split_fallback": f"too few distinct {cfg.split_by} groups ({splits['group'].nunique()}) to fill "
                                  "val and test: split material by material"} if fallback else {}),
            "rejects": {str(k): int(v) for k, v in reject_counts.items()},
            "non_finite_values": non_finite,
            "run": {"workers": workers, "seconds": round(seconds, 2)},
        },
    )
    _summary(ws, flags, tally, rejects, reject_counts, seconds, len(ids),
             (cfg.split_by, int(splits["group"].nunique())) if fallback else None)
    if recipe_counts.get("rows"):
        c = recipe_counts
        console.print(f"{c['rows']:,} of {c['recipes']:,} synthesis recipes kept as rows of their own in "
                      f"{RECIPES_FILE} ({c['train_recipes']:,} train / {c['val_recipes']:,} val / {c['test_recipes']:,} "
                      f"test; {c['no_target_composition']:,} targets without a fixed composition have text only).",
                      highlight=False)
    if non_finite:
        detail = ", ".join(f"{n} in {name}" for name, n in non_finite.items())
        console.print(esc(f"Infinite property values were stored as missing: {detail}."), highlight=False)
    return manifest


def _summary(ws: Workspace, flags: pd.DataFrame, tally: Tally, rejects, reject_counts, seconds: float, n: int,
             fallback: tuple[str, int] | None = None) -> None:
    labels = list(tally.labels())
    table = Table(title=esc(f"processed/ in {ws.root}: materials per split and modality"), title_justify="left")
    table.add_column("split")
    table.add_column("materials", justify="right")
    for name in labels:
        table.add_column(name, justify="right")
    for split in (*SPLITS, "all"):
        part = flags if split == "all" else flags[flags["split"] == split]
        table.add_row(split, str(len(part)), *(str(int(part[name].sum())) for name in labels))
    console.print(table)
    for modality in tally.modalities:
        for note in modality.notes(tally.counts):
            console.print(note, highlight=False)
    if fallback:
        by, groups = fallback
        console.print(f"[yellow]Split per material[/]: the {n} materials have only {groups} distinct {by} "
                      f"group{'s' * (groups != 1)}, too few to fill val and test, so materials were split one by one "
                      f"(val and test share {by}s with train: scores there are optimistic).", highlight=False)
    for split in SPLITS:
        if not (flags["split"] == split).any():
            console.print(f"[yellow]The {split} split is empty[/]: too few distinct groups for the fractions asked.")
    if rejects:
        detail = ", ".join(f"{v} {k}" for k, v in reject_counts.items())
        console.print(esc(f"{len(rejects)} rejects ({detail}), reasons in {ws.processed / REJECTS_FILE}."), highlight=False)
    console.print(f"Preprocessed {n} materials in {seconds:.1f} s ({n / max(seconds, 1e-9):.0f} materials/s).")
