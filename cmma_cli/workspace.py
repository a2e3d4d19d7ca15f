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
manifest is missing is not trusted (the stage was interrupted). Every file is written through
:func:`atomic` (a temporary name beside it, renamed into place when complete), so a reader never sees half
a file; :meth:`Workspace.finished` lists a stage's finished runs and :class:`RunFiles` names a training
run's files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
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

#: The folder below the workspace root that holds each per-run stage's runs (``<ws>/<folder>/<run>/``).
RUN_FOLDERS = {"train": "runs", "embed": "embeddings", "evaluate": "reports"}

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

    def run_files(self, run: str) -> "RunFiles":
        """The files of training run ``run`` (checkpoints, metrics, config)."""
        return RunFiles(self.run_dir(run))

    def embeddings_dir(self, run: str) -> Path:
        return self.root / "embeddings" / run

    def reports_dir(self, run: str) -> Path:
        return self.root / "reports" / run

    def finished(self, stage: str) -> list[str]:
        """Names of the runs of ``stage`` whose manifest exists (finished), oldest first (by manifest time).

        ``stage`` is a stage (``train``, ``embed``, ``evaluate``) or its folder (``runs``, ``embeddings``,
        ``reports``): the runs are the folders ``<ws>/<folder>/<run>/``.
        """
        folder = self.root / RUN_FOLDERS.get(stage, stage)
        found = [p for p in folder.glob("*/") if (p / MANIFEST).is_file()]
        return [p.name for p in sorted(found, key=lambda p: ((p / MANIFEST).stat().st_mtime, p.name))]

    def latest_checkpoint(self) -> Path | None:
        """The newest training checkpoint to resume from (``runs/<run>/last.pt``, finished or not), or None."""
        found = [p for p in (self.root / RUN_FOLDERS["train"]).glob("*/last.pt") if p.is_file()]
        return max(found, key=lambda p: (p.stat().st_mtime, p.parent.name)) if found else None

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


@dataclass(frozen=True)
class RunFiles:
    """The files of one training run, ``<ws>/runs/<run>/`` (``RunFiles(ws.run_dir(run))``)."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def config(self) -> Path:
        """The run's ``[train]`` config, usable with ``--config``."""
        return self.root / "config.toml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch-{epoch:03d}.pt"

    @property
    def last(self) -> Path:
        return self.root / "last.pt"

    @property
    def best(self) -> Path:
        return self.root / "best.pt"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @classmethod
    def of_checkpoint(cls, path: Path) -> "RunFiles":
        """The run a checkpoint file belongs to (``<run>/checkpoints/epoch-NNN.pt`` or ``<run>/last.pt``)."""
        parent = Path(path).parent
        return cls(parent.parent if parent.name == "checkpoints" else parent)

    def has_training(self) -> bool:
        """Whether training already wrote checkpoints or metrics here."""
        return self.checkpoints.exists() or self.metrics.exists()

    def clear_training(self) -> None:
        """Delete what training wrote (checkpoints, metrics, TensorBoard events), to start the run over."""
        for folder in (self.checkpoints, self.tensorboard):
            shutil.rmtree(folder, ignore_errors=True)
        for path in (self.metrics, self.last, self.best):
            path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- writing


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


class atomic:
    """Write one file all at once: a temporary path beside ``path`` to write to, renamed onto ``path`` when done.

    As a context manager it yields the temporary path, renames it into place when the block succeeds and
    deletes it when the block raises (the old file, if any, stays)::

        with atomic(path) as tmp:
            torch.save(state, tmp)

    A writer that spans several calls (a Parquet file written row group by row group) keeps the object and
    calls :meth:`commit` or :meth:`discard` itself; ``.tmp`` is the temporary path. The folder is created.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = _tmp_name(self.path)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        if kind is None:
            self.commit()
        else:
            self.discard()
        return False

    def commit(self) -> Path:
        """Move the finished temporary file onto ``path``; returns ``path``."""
        os.replace(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        """Delete the temporary file (what ``path`` held before stays)."""
        self.tmp.unlink(missing_ok=True)


def write_table(df: pd.DataFrame, path: Path) -> Path:
    """Write ``df`` to ``path`` as Parquet, atomically."""
    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    with atomic(path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE)
    return Path(path)


def write_arrow(table: pa.Table, path: Path) -> Path:
    """Write an Arrow table as Parquet, atomically."""
    with atomic(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


class ParquetStream:
    """One Parquet file written row group by row group, under a temporary name until :meth:`close`."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path = Path(path)
        self.file = atomic(self.path)
        self.writer = pq.ParquetWriter(self.file.tmp, schema)

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)

    def close(self) -> None:
        self.writer.close()
        self.file.commit()

    def abort(self) -> None:
        self.writer.close()
        self.file.discard()


def read_table(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a Parquet table written by :func:`write_table`."""
    return pq.read_table(path, columns=columns).to_pandas()


def write_json(obj: Any, path: Path) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    with atomic(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_text(text: str, path: Path) -> Path:
    """Write ``text`` to ``path``, atomically."""
    with atomic(path) as tmp:
        tmp.write_text(text)
    return Path(path)


# ------------------------------------------------------------------------------------------ manifests


def file_digest(path: Path | str) -> str:
    """SHA-256 (16 hex digits) of a file's bytes, read in 1 MiB blocks (checkpoints, weights files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


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
