"""``cmma fetch``: run one source and write ``raw/`` (materials, synthesis links, descriptions, rejects).

The source runs first and the workspace is touched only when it succeeded, so a failed fetch never
destroys raw data fetched earlier. The Materials Project source keeps finished chunks in ``raw/.partial``
so that re-running the same command continues where it stopped; they are removed once ``raw/`` is written.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
from rich.table import Table

from cmma_cli.config import FetchConfig, as_dict, validate
from cmma_cli.console import console, esc
from cmma_cli.errors import CMMAError
from cmma_cli.sources.schema import KNOWN_PROPERTIES, RawData, clear_non_finite, rejects_frame
from cmma_cli.workspace import Workspace, begin_stage, is_up_to_date, read_manifest, write_manifest, write_table



def _fingerprint(paths: list[str]) -> list[list[Any]]:
    """(path, size, mtime) of every local input, so a changed file makes the stage stale."""
    out = []
    for p in map(Path, paths):
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            if f.exists():
                st = f.stat()
                out.append([str(f.resolve()), st.st_size, int(st.st_mtime)])
    return out


def _load(cfg: FetchConfig, api_key: str | None, partial_dir: Path) -> RawData:
    if cfg.source == "sample":
        from cmma_cli.sources.sample import load_sample

        return load_sample()
    if cfg.source == "local":
        from cmma_cli.sources.local import load_local

        return load_local(cfg.paths)
    from cmma_cli.sources.materials_project import fetch_materials_project

    return fetch_materials_project(cfg, api_key, partial_dir)


def apply_filters(raw: RawData, cfg: FetchConfig) -> RawData:
    """Apply the element / chemical-system / size / stability / limit filters to a local or sample source."""
    m = raw.materials
    keep = pd.Series(True, index=m.index)
    if cfg.elements:
        want = set(cfg.elements)
        keep &= m["elements"].map(lambda els: want.issubset(els))
    if cfg.chemsys:
        system = sorted(cfg.chemsys.split("-"))
        keep &= m["elements"].map(lambda els: sorted(els) == system)
    if cfg.max_sites:
        keep &= m["nsites"] <= cfg.max_sites
    if cfg.stable_only:
        stable = m["is_stable"].fillna(m["energy_above_hull"].le(1e-6)).fillna(False)
        keep &= stable.astype(bool)
    m = m[keep]
    if cfg.limit:
        m = m.head(cfg.limit)
    ids = set(m["material_id"])
    raw.materials = m.reset_index(drop=True)
    raw.synthesis = raw.synthesis[raw.synthesis["material_id"].isin(ids)].reset_index(drop=True)
    raw.descriptions = raw.descriptions[raw.descriptions["material_id"].isin(ids)].reset_index(drop=True)
    return raw


def resolve_source(cfg: FetchConfig, api_key: str | None) -> FetchConfig:
    """``cfg`` with its source decided: as given, else local when it has paths, mp with an API key, else the sample."""
    source = cfg.source
    if source is None:
        if cfg.paths:
            source = "local"
        elif api_key:
            source = "mp"
        else:
            source = "sample"
            console.print("Using the built-in sample (real structures shipped with pymatgen, no network). To fetch "
                          "from the Materials Project, set MP_API_KEY or pass --api-key.", highlight=False)
    if cfg.paths and source != "local":
        raise CMMAError(f"PATHS are only read with --source local (you gave --source {source}): drop them or use "
                        "--source local.")
    return replace(cfg, source=source)


def run_fetch(ws: Workspace, cfg: FetchConfig, api_key: str | None = None, force: bool = False) -> dict[str, Any]:
    """Fetch raw data into ``ws.raw`` and return its manifest (the existing one when up to date).

    ``cfg.source`` None picks the source (see :func:`resolve_source`).
    """
    cfg = resolve_source(validate(cfg), api_key)
    config = as_dict(cfg)
    if cfg.endpoint:  # credentials in the URL (user:password@, ?api_key=) never reach the manifest
        from cmma_cli.sources.materials_project import public_url

        config["endpoint"] = public_url(cfg.endpoint)
    if cfg.source == "local":
        config["files"] = _fingerprint(cfg.paths)
    if not force and is_up_to_date(ws.raw, config):
        manifest = read_manifest(ws.raw)
        console.print(f"[green]raw/ is up to date[/] ({manifest['rows'].get('materials', 0)} materials from "
                      f"{cfg.source}); use --force to fetch again.")
        return manifest

    start = time.perf_counter()
    partial_dir = ws.raw / ".partial"
    if force:  # --force means fetch everything again, not continue an interrupted fetch
        shutil.rmtree(partial_dir, ignore_errors=True)
    raw = _load(cfg, api_key, partial_dir)
    if cfg.source != "mp":  # the Materials Project applies its filters on the server
        raw = apply_filters(raw, cfg)
    if raw.materials.empty:
        raise CMMAError("The filters matched no materials: loosen --elements/--chemsys/--max-sites/--stable-only.")
    non_finite = clear_non_finite(raw.materials)  # inf in a property column: missing, and counted

    begin_stage(ws.raw)
    write_table(raw.materials, ws.raw / "materials.parquet")
    write_table(raw.synthesis, ws.raw / "synthesis.parquet")
    write_table(raw.descriptions, ws.raw / "descriptions.parquet")
    write_table(rejects_frame(raw.rejects), ws.raw / "rejects.parquet")
    if raw.recipes is not None:  # every recipe read, with or without a structure (cmma recommend reads them)
        write_table(raw.recipes, ws.raw / "recipes.parquet")
    else:
        (ws.raw / "recipes.parquet").unlink(missing_ok=True)
    rows = {
        "materials": len(raw.materials),
        "synthesis_links": len(raw.synthesis),
        "recipes": int(raw.synthesis["recipe_id"].nunique()) if len(raw.synthesis) else 0,
        "materials_with_recipes": int(raw.synthesis["material_id"].nunique()) if len(raw.synthesis) else 0,
        "descriptions": len(raw.descriptions),
        "rejects": len(raw.rejects),
    }
    if raw.recipes is not None:
        rows["all_recipes"] = len(raw.recipes)
    seconds = time.perf_counter() - start
    manifest = write_manifest(
        ws.raw, "fetch", config, rows=rows,
        extra={"source": cfg.source, "properties": _property_columns(raw), "counts": raw.counts,
               "non_finite_values": non_finite, "seconds": round(seconds, 2)},
    )
    shutil.rmtree(partial_dir, ignore_errors=True)
    _print_summary(ws, cfg, rows, raw.counts, seconds)
    if non_finite:
        detail = ", ".join(f"{n} in {name}" for name, n in non_finite.items())
        console.print(esc(f"Infinite property values were stored as missing: {detail}."), highlight=False)
    return manifest


def _property_columns(raw: RawData) -> list[str]:
    """Property columns that hold at least one value."""
    names = list(KNOWN_PROPERTIES) + raw.extra_properties
    return [n for n in names if n in raw.materials and raw.materials[n].notna().any()]


def _print_summary(ws: Workspace, cfg: FetchConfig, rows: dict[str, int], counts: dict[str, int], seconds: float) -> None:
    table = Table(title=esc(f"cmma fetch --source {cfg.source}  ->  {ws.raw}"), title_justify="left")
    table.add_column("table")
    table.add_column("rows", justify="right")
    table.add_row("materials", f"{rows['materials']:,}")
    table.add_row("synthesis links", f"{rows['synthesis_links']:,} ({rows['recipes']:,} recipes, "
                  f"{rows['materials_with_recipes']:,} materials)")
    table.add_row("descriptions", f"{rows['descriptions']:,}")
    table.add_row("rejects", f"{rows['rejects']:,}" + (" (see raw/rejects.parquet)" if rows["rejects"] else ""))
    console.print(table)
    if counts.get("recipes"):
        console.print(
            f"Recipes read: {counts['recipes']:,}; linked to a material: {counts['linked']:,}; target not among "
            f"these materials: {counts['unlinked']:,}; target not a fixed composition (e.g. La1-xCaxMnO3): "
            f"{counts['variable_target']:,}.", highlight=False)
    console.print(f"Done in {seconds:.1f} s.")
