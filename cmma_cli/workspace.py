"""The workspace: the only code that knows where artifacts live and how they are written.

Layout (``<ws>`` is ``--workspace/-w``, else ``$CMMA_WORKSPACE``, else ``./data``)::

    <ws>/raw/                 materials.parquet, synthesis.parquet, descriptions.parquet, rejects.parquet
    <ws>/processed/           materials.parquet, splits.parquet
    <ws>/runs/<run>/          config.toml, checkpoints/, metrics.csv
    <ws>/embeddings/<run>/    <modality>.parquet, unified.parquet, index files
    <ws>/reports/<run>/       report.md, metrics.json, figures/
    <ws>/cache/               rebuildable derived data (frozen text embeddings); safe to delete

Every stage directory holds a ``manifest.json`` written *last*: the stage, the package version, the
config that made it, the hashes of its inputs' manifests, row counts and the time. A directory whose
manifest is missing is not trusted (the stage was interrupted); tables are written to a temporary name
and renamed, so a reader never sees half a table.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cmma_cli import __version__
from cmma_cli.errors import CMMAError

#: Bumped whenever an artifact's layout changes in a way older readers cannot follow.
ARTIFACT_FORMAT = 1
MANIFEST = "manifest.json"
#: Rows per Parquet row group: later stages stream tables a row group at a time, so memory stays flat.
ROW_GROUP_SIZE = 2048
ENV_VAR = "CMMA_WORKSPACE"

#: Which command makes each stage, for the "run X first" sentences.
STAGE_COMMANDS = {
    "fetch": "cmma fetch",
    "preprocess": "cmma preprocess",
    "train": "cmma train",
    "embed": "cmma embed",
    "evaluate": "cmma evaluate",
}


@dataclass(frozen=True)
class Workspace:
    """A workspace root and the stage directories below it."""

    root: Path

    @classmethod
    def resolve(cls, option: Path | None = None) -> "Workspace":
        """The workspace from the ``-w`` option, else ``$CMMA_WORKSPACE``, else ``./data``."""
        if option is not None:
            root = Path(option)
        elif os.environ.get(ENV_VAR):
            root = Path(os.environ[ENV_VAR])
        else:
            root = Path("data")
        if root.exists() and not root.is_dir():
            raise CMMAError(f"The workspace {root} is a file, not a folder: pass a folder with --workspace.")
        return cls(root.expanduser().resolve())

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def processed(self) -> Path:
        return self.root / "processed"

    def run_dir(self, run: str) -> Path:
        return self.root / "runs" / run

    def embeddings_dir(self, run: str) -> Path:
        return self.root / "embeddings" / run

    def reports_dir(self, run: str) -> Path:
        return self.root / "reports" / run

    @property
    def cache(self) -> Path:
        """Derived data that can be rebuilt at any time (the frozen text model's sentence embeddings)."""
        return self.root / "cache"

    def portable(self, path: Path) -> str:
        """``path`` as manifests record it: relative to the root when inside it (a moved workspace still works)."""
        path = Path(path).resolve()
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def locate(self, recorded: str) -> Path:
        """The absolute path of a path a manifest recorded with :meth:`portable` (absolute ones as they are)."""
        path = Path(recorded)
        return path if path.is_absolute() else self.root / path


# --------------------------------------------------------------------------------------------- tables


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_table(df: pd.DataFrame, path: Path) -> Path:
    """Write ``df`` to ``path`` as Parquet, atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE)
    os.replace(tmp, path)
    return path


def read_table(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a Parquet table written by :func:`write_table`."""
    return pq.read_table(path, columns=columns).to_pandas()


def write_json(obj: Any, path: Path) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------ manifests


def config_hash(config: dict[str, Any]) -> str:
    """A stable hash of a stage's config (JSON with sorted keys)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def manifest_hash(stage_dir: Path) -> str:
    """The hash that later stages record for this stage's output (its manifest's bytes)."""
    return hashlib.sha256((stage_dir / MANIFEST).read_bytes()).hexdigest()[:16]


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    """The manifest of a finished stage, or ``None`` when the stage never finished."""
    path = stage_dir / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _input_key(input_dir: Path) -> str:
    """Inputs are recorded under their own stage name (``fetch``, ``preprocess``, ...)."""
    manifest = read_manifest(input_dir)
    return manifest["stage"] if manifest else input_dir.name


def begin_stage(stage_dir: Path) -> None:
    """Mark ``stage_dir`` as being rewritten: its manifest goes first, so an interrupted run is not trusted."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / MANIFEST).unlink(missing_ok=True)


def write_manifest(
    stage_dir: Path,
    stage: str,
    config: dict[str, Any],
    inputs: Iterable[Path] = (),
    rows: dict[str, int] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Finish a stage: write its manifest (last, after every table)."""
    manifest = {
        "stage": stage,
        "format": ARTIFACT_FORMAT,
        "version": __version__,
        "config": config,
        "config_hash": config_hash(config),
        "inputs": {_input_key(p): manifest_hash(p) for p in inputs},
        "rows": rows or {},
        "created": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
    }
    if extra:
        manifest.update(extra)
    write_json(manifest, stage_dir / MANIFEST)
    return manifest


def is_up_to_date(stage_dir: Path, config: dict[str, Any], inputs: Iterable[Path] = ()) -> bool:
    """True when ``stage_dir`` finished with this config, from inputs that have not changed since."""
    manifest = read_manifest(stage_dir)
    if manifest is None or manifest.get("format") != ARTIFACT_FORMAT:
        return False
    if manifest.get("config_hash") != config_hash(config):
        return False
    recorded = manifest.get("inputs", {})
    for p in inputs:
        if read_manifest(p) is None or recorded.get(_input_key(p)) != manifest_hash(p):
            return False
    return True


def require_stage(stage_dir: Path, stage: str) -> dict[str, Any]:
    """The manifest of an input stage, or one sentence saying which command makes it."""
    command = STAGE_COMMANDS.get(stage, f"cmma {stage}")
    manifest = read_manifest(stage_dir)
    if manifest is None:
        raise CMMAError(f"No finished `{stage}` output in {stage_dir}: run `{command}` first.")
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise CMMAError(
            f"{stage_dir} was written by cmma {manifest.get('version', '?')} in an older layout: "
            f"run `{command} --force` to rebuild it."
        )
    return manifest
