"""What ``cmma evaluate`` reads: the processed materials (properties + splits) and one run's embeddings.

Embeddings follow the contract of ``cmma embed`` (``<ws>/embeddings/<run>/``): ``<modality>.parquet``
and ``unified.parquet`` (``material_id``, ``embedding``), ``synthesis.parquet`` (``recipe_id``,
``material_id``, ``embedding``). Properties come from ``processed/materials.parquet`` (only the light
columns: no graphs, no patterns), the split of every material from ``processed/splits.parquet``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from cmma_cli.embeddings import UNIFIED
from cmma_cli.errors import CMMAError
from cmma_cli.properties import non_property, numeric_properties
from cmma_cli.workspace import Workspace, manifest_problem, read_table, require_stage

#: The embedding table of the synthesis recipes (one row per recipe link), made by a modality's encoder.
SYNTHESIS = "synthesis"
#: The embeddings folder of the workspace, whose finished runs can be evaluated.
EMBEDDINGS = "embeddings"


def read_artifact(path: Path, columns: list[str] | None, rebuild: str, schema_only: bool = False):
    """A Parquet artifact as a DataFrame (``schema_only``: its column names), or one sentence naming the file and
    the command that rebuilds it when it is not Parquet, is damaged, or lacks ``columns`` (another tool's file)."""
    import pyarrow as pa

    try:
        if schema_only:
            return pq.ParquetFile(path).schema_arrow.names
        names = pq.ParquetFile(path).schema_arrow.names
        missing = [c for c in columns or [] if c not in names]
        if missing:
            raise CMMAError(f"{path} lacks the column{'s' * (len(missing) > 1)} {', '.join(missing)} (it was not written "
                            f"by this version of cmma): run `{rebuild}` to rebuild it.")
        return read_table(path, columns=columns)
    except FileNotFoundError:
        raise CMMAError(f"{path} is missing: run `{rebuild}` to rebuild it.") from None
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CMMAError(f"{path} is not a readable Parquet file ({type(exc).__name__}: {str(exc)[:100]}): run "
                        f"`{rebuild}` to rebuild it.") from None


def material_tables() -> tuple[str, ...]:
    """Embedding tables that are one row per material (everything but ``synthesis``), in report order:
    ``unified``, then every registered modality."""
    from cmma_cli.modalities import names

    return (UNIFIED, *names())


def resolve_run(ws: Workspace, run: str | None) -> str:
    """``run``, or the newest run with embeddings; one sentence when there is none."""
    runs = ws.finished(EMBEDDINGS)
    if run is None:
        if not runs:
            raise CMMAError(f"There are no embeddings in {ws.root / EMBEDDINGS} to evaluate: run `cmma embed` first.")
        return runs[-1]
    if run not in runs:
        if manifest_problem(ws.embeddings_dir(run)):  # there, but its manifest is broken: the sentence names it
            require_stage(ws.embeddings_dir(run), "embed")
        known = ", ".join(runs) or "none yet"
        raise CMMAError(f"Run {run!r} has no embeddings in {ws.root / EMBEDDINGS} (embedded runs: {known}): "
                        f"run `cmma embed --run {run}` first.")
    return run


@dataclass
class Embeddings:
    """One embedding table: ``ids[i]`` is the material (or recipe link) of row ``vectors[i]``."""

    ids: np.ndarray  # (rows,) str material ids
    vectors: np.ndarray  # (rows, d) float32, L2-normalised

    def rows_of(self, material_ids: np.ndarray) -> np.ndarray:
        """Row numbers of ``material_ids`` in this table (-1 where absent)."""
        position = {m: i for i, m in enumerate(self.ids)}
        return np.array([position.get(m, -1) for m in material_ids], dtype=np.int64)


@dataclass
class EvalData:
    """Everything the evaluation sections read, for one run."""

    run: str
    materials: pd.DataFrame  # material_id, formula, elements, properties..., split, group
    tables: dict[str, Embeddings]  # unified and each modality
    synthesis: pd.DataFrame | None  # recipe_id, material_id (the links), with ``vectors`` alongside
    synthesis_vectors: np.ndarray | None
    manifest: dict[str, Any]
    processed_manifest: dict[str, Any]
    numeric_properties: list[str] = field(default_factory=list)  # numeric properties some material has a value of
    checkpoint: Path | None = None  # the checkpoint that made the embeddings (None: the manifest names none)

    def split_ids(self, split: str) -> np.ndarray:
        """The material ids of one split (train | val | test), or of every split (``all``)."""
        if split == "all":
            return self.materials["material_id"].to_numpy()
        return self.materials.loc[self.materials["split"] == split, "material_id"].to_numpy()

    @property
    def modalities(self) -> list[str]:
        """The modality tables present (not ``unified``)."""
        return [m for m in self.tables if m != UNIFIED]


def _vectors(frame: pd.DataFrame, path: Path) -> np.ndarray:
    if frame.empty:
        return np.zeros((0, 0), dtype=np.float32)
    try:
        return np.stack([np.asarray(v, dtype=np.float32) for v in frame["embedding"]])
    except (ValueError, TypeError):
        raise CMMAError(f"{path} holds embeddings that are not number vectors of one length: run "
                        "`cmma embed --force`.") from None


def load_eval_data(ws: Workspace, run: str) -> EvalData:
    """The embeddings of ``run`` and the processed materials with their splits, or one sentence saying what to run."""
    processed = require_stage(ws.processed, "preprocess")
    emb_dir = ws.embeddings_dir(run)
    manifest = require_stage(emb_dir, "embed")
    materials_path = ws.processed / "materials.parquet"
    splits_path = ws.processed / "splits.parquet"
    if not materials_path.exists() or not splits_path.exists():
        raise CMMAError(f"{ws.processed} lacks materials.parquet or splits.parquet: run `cmma preprocess --force`.")
    rebuild = "cmma preprocess --force"
    names = read_artifact(materials_path, None, rebuild, schema_only=True)
    skip = non_property() - {"material_id", "formula", "elements"}
    light = [c for c in names if c not in skip]
    if "material_id" not in light:
        read_artifact(materials_path, ["material_id"], rebuild)  # the sentence for a foreign table
    materials = read_artifact(materials_path, light, rebuild)
    materials["material_id"] = materials["material_id"].astype(str)
    splits = read_artifact(splits_path, ["material_id", "split", "group"], rebuild)
    splits["material_id"] = splits["material_id"].astype(str)
    materials = materials.merge(splits[["material_id", "split", "group"]], on="material_id", how="inner")

    tables: dict[str, Embeddings] = {}
    for name in material_tables():
        path = emb_dir / f"{name}.parquet"
        if path.exists():
            frame = read_artifact(path, ["material_id", "embedding"], f"cmma embed --run {run} --force")
            tables[name] = Embeddings(frame["material_id"].astype(str).to_numpy(), _vectors(frame, path))
    if UNIFIED not in tables:
        raise CMMAError(f"{emb_dir} has no unified.parquet: run `cmma embed --run {run} --force`.")
    synthesis, synthesis_vectors = None, None
    path = emb_dir / f"{SYNTHESIS}.parquet"
    if path.exists():
        frame = read_artifact(path, ["recipe_id", "material_id", "embedding"], f"cmma embed --run {run} --force")
        synthesis_vectors = _vectors(frame, path)
        synthesis = frame[["recipe_id", "material_id"]].astype(str).reset_index(drop=True)
    candidates = list(processed.get("properties", [])) or [c for c in materials.columns]
    recorded = manifest.get("checkpoint", {}).get("path")
    return EvalData(run, materials.reset_index(drop=True), tables, synthesis, synthesis_vectors, manifest,
                    processed, [c for c in numeric_properties(materials, candidates) if materials[c].notna().any()],
                    ws.locate(recorded) if recorded else None)
