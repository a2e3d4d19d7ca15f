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

One writer per stage output: :func:`stage_lock` takes an exclusive lock on a stage folder (``processed/``, a
run, a run's embeddings or report) through a lock file beside it (``<parent>/.<name>.lock``, an OS lock that
dies with its process, so a killed holder never leaves it stuck); a second writer is refused at once with one
sentence naming the holder (pid, host, start time). :func:`begin_stage` takes it too when its caller did not.
Run names are plain folder names (:func:`check_run_name`), so every run lives below the workspace.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, Iterable, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cmma_cli import __version__
from cmma_cli.errors import CMMAError, write_error

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
        return self.root / "runs" / check_run_name(run)

    def run_files(self, run: str) -> "RunFiles":
        """The files of training run ``run`` (checkpoints, metrics, config)."""
        return RunFiles(self.run_dir(run))

    def embeddings_dir(self, run: str) -> Path:
        return self.root / "embeddings" / check_run_name(run)

    def reports_dir(self, run: str) -> Path:
        return self.root / "reports" / check_run_name(run)

    def owns_run(self, folder: Path) -> bool:
        """Whether ``folder`` is a training run's folder of this workspace (``<ws>/runs/<run>/``)."""
        folder = Path(folder).resolve()
        return folder.parent == (self.root / RUN_FOLDERS["train"]).resolve() and is_run_name(folder.name)

    def finished(self, stage: str) -> list[str]:
        """Names of the runs of ``stage`` with a readable manifest (finished), oldest first (by manifest time).

        ``stage`` is a stage (``train``, ``embed``, ``evaluate``) or its folder (``runs``, ``embeddings``,
        ``reports``): the runs are the folders ``<ws>/<folder>/<run>/``.
        """
        folder = self.root / RUN_FOLDERS.get(stage, stage)
        found = [p for p in folder.glob("*/") if is_run_name(p.name) and read_manifest(p) is not None]
        return [p.name for p in sorted(found, key=lambda p: ((p / MANIFEST).stat().st_mtime, p.name))]

    def latest_checkpoint(self) -> Path | None:
        """The newest training checkpoint to resume from (``runs/<run>/last.pt``, finished or not), or None.

        A run killed between writing an epoch's checkpoint and ``last.pt`` counts by its newest epoch checkpoint.
        """
        found = []
        for run in (self.root / RUN_FOLDERS["train"]).glob("*/"):
            if is_run_name(run.name):
                files = RunFiles(run)
                found += [p for p in [files.last, *files.epoch_checkpoints()[-1:]] if p.is_file()]
        best = max(found, key=lambda p: (p.stat().st_mtime, p.name == "last.pt", str(p))) if found else None
        return RunFiles.of_checkpoint(best).last if best is not None else None

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

    def epoch_checkpoints(self) -> list[Path]:
        """The run's ``checkpoints/epoch-NNN.pt`` files, oldest epoch first."""
        return sorted(p for p in self.checkpoints.glob("epoch-*.pt") if p.is_file())

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
        """Delete what training wrote (checkpoints, metrics, TensorBoard events), to start the run over.

        The manifest goes first: a run being started over is not a finished run.
        """
        (self.root / MANIFEST).unlink(missing_ok=True)
        for folder in (self.checkpoints, self.tensorboard):
            shutil.rmtree(folder, ignore_errors=True)
        for path in (self.metrics, self.last, self.best):
            path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ run names


def is_run_name(name: str) -> bool:
    """Whether ``name`` can name a run: one plain folder name (no path separator, no ``..``, no leading dot)."""
    seps = {"/", "\\", os.sep, *([os.altsep] if os.altsep else [])}
    return bool(name) and not name.startswith(".") and not any(c in name for c in seps) and "\0" not in name


def check_run_name(name: str) -> str:
    """``name`` when it is a plain run name (:func:`is_run_name`), else one sentence: runs live only in ``<ws>/runs/``."""
    if not isinstance(name, str) or not is_run_name(name):
        raise CMMAError(f"The run name {name!r} is not a plain folder name (runs live only in the workspace's runs/ "
                        "folder): pass --run with a name that has no '/', '\\', '..' or leading '.'.")
    return name


# ----------------------------------------------------------------------------------------------- locks

try:  # POSIX: an OS lock, released by the kernel when its process dies (however it dies)
    import fcntl
except ImportError:  # pragma: no cover - Windows: an exclusive lock file, stale when its pid is gone
    fcntl = None  # type: ignore[assignment]

HOST = socket.gethostname()


@dataclass
class _Held:
    fd: int
    depth: int  # open stage_lock blocks; 0: taken by begin_stage, released by write_manifest
    path: Path


_HELD: dict[str, _Held] = {}
_HELD_GUARD = threading.Lock()


def lock_path(stage_dir: Path) -> Path:
    """The lock file of a stage folder: ``<parent>/.<name>.lock`` (beside it, so a folder swap keeps the lock)."""
    stage_dir = Path(stage_dir)
    return stage_dir.parent / f".{stage_dir.name}.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _refusal(what: str, path: Path) -> CMMAError:
    h = _holder(path)
    if h.get("pid"):
        who = f"pid {h['pid']} on {h.get('host', '?')}, started {h.get('started', '?')}"
        if h.get("host") == HOST and not _alive(int(h["pid"])):
            who += ", now gone but a process it started still holds the lock"
    else:
        who = "holder not recorded yet"
    return CMMAError(f"{what} is being written by another cmma process ({who}): wait for it to finish or stop it, "
                     f"then run the command again.")


def _acquire(path: Path, what: str) -> int:
    _mkdir(path.parent)
    record = json.dumps({"pid": os.getpid(), "host": HOST,
                         "started": datetime.now().astimezone().isoformat(timespec="seconds")}).encode()
    if fcntl is not None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise (write_error(exc, path) or exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise _refusal(what, path) from None
        os.ftruncate(fd, 0)
        os.write(fd, record)
        return fd
    for _ in range(2):  # pragma: no cover - without fcntl
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            h = _holder(path)
            if h.get("host") == HOST and h.get("pid") and not _alive(int(h["pid"])):
                path.unlink(missing_ok=True)  # its holder died: the lock is stale
                continue
            raise _refusal(what, path) from None
        os.write(fd, record)
        return fd
    raise _refusal(what, path)  # pragma: no cover


def _release(held: _Held) -> None:
    try:
        if fcntl is not None:
            os.ftruncate(held.fd, 0)
            fcntl.flock(held.fd, fcntl.LOCK_UN)
        else:  # pragma: no cover
            held.path.unlink(missing_ok=True)
    finally:
        os.close(held.fd)


def _take(stage_dir: Path, what: str | None, block: bool) -> str:
    path = lock_path(Path(stage_dir).resolve())
    key = str(path)
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is None:
            held = _HELD[key] = _Held(_acquire(path, what or f"{stage_dir}"), 0, path)
        if block:
            held.depth += 1
    return key


@contextmanager
def stage_lock(stage_dir: Path, what: str | None = None) -> Iterator[Path]:
    """Hold the exclusive write lock of ``stage_dir`` for the block; yields ``stage_dir``.

    Refuses at once (a :class:`CMMAError` naming the holder's pid, host and start time) when another process holds
    it; re-entrant within a process. ``what`` names the output in that sentence (e.g. ``"Run 'first'"``). The
    lock is the OS's (``flock``): a holder that is killed releases it, so it never stays stuck.
    """
    key = _take(stage_dir, what or f"The stage folder {stage_dir}", block=True)
    try:
        yield Path(stage_dir)
    finally:
        with _HELD_GUARD:
            held = _HELD[key]
            held.depth -= 1
            if held.depth == 0:
                del _HELD[key]
                _release(held)


def _release_begun(stage_dir: Path) -> None:
    """Release the lock :func:`begin_stage` took (not one a :func:`stage_lock` block holds)."""
    key = str(lock_path(Path(stage_dir).resolve()))
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None and held.depth == 0:
            del _HELD[key]
            _release(held)


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
        _mkdir(self.path.parent)
        self.tmp = _tmp_name(self.path)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        if kind is None:
            self.commit()
            return False
        self.discard()
        friendly = write_error(exc, self.path)  # a full disk or a read-only folder: one sentence, not a traceback
        if friendly is not None:
            raise friendly from None
        return False

    def commit(self) -> Path:
        """Move the finished temporary file onto ``path``; returns ``path``. When the move fails the temporary file
        is deleted (the old ``path`` stays) and a full disk or a read-only folder is one sentence."""
        try:
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self.discard()
            raise (write_error(exc, self.path) or exc) from None
        return self.path

    def discard(self) -> None:
        """Delete the temporary file (what ``path`` held before stays)."""
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError:  # pragma: no cover - a folder that lost its write permission meanwhile: nothing more to do
            pass


def _mkdir(folder: Path) -> None:
    """Create ``folder`` (and its parents); a full disk or a read-only workspace is one sentence."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise (write_error(exc, folder) or exc) from None


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
        try:
            self.writer = pq.ParquetWriter(self.file.tmp, schema)
        except OSError as exc:
            self.file.discard()
            raise (write_error(exc, self.path) or exc) from None

    def write(self, table: pa.Table) -> None:
        try:
            self.writer.write_table(table)
        except OSError as exc:
            raise (write_error(exc, self.path) or exc) from None

    def close(self) -> None:
        try:
            self.writer.close()
        except OSError as exc:
            self.file.discard()
            raise (write_error(exc, self.path) or exc) from None
        self.file.commit()

    def abort(self) -> None:
        """Drop what was written (the temporary file goes even when closing the writer fails: a full disk)."""
        try:
            self.writer.close()
        except Exception:
            pass
        finally:
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


#: Files up to this size are digested whole; larger ones by :data:`SAMPLES` evenly spaced blocks (constant time).
WHOLE_DIGEST = 8 << 20
SAMPLES, SAMPLE_BLOCK = 64, 64 << 10


def fast_digest(path: Path | str) -> str:
    """A digest of a file's content that costs the same for any size: SHA-256 (16 hex digits) of its size and bytes
    when it is small, else of its size and :data:`SAMPLES` blocks spread from the first byte to the last. A file
    swapped for another (copied from another workspace, rewritten by hand) does not keep it."""
    path = Path(path)
    size = path.stat().st_size
    if size <= WHOLE_DIGEST:
        return file_digest(path)
    digest = hashlib.sha256(str(size).encode())
    step = (size - SAMPLE_BLOCK) / (SAMPLES - 1)
    with open(path, "rb") as fh:
        for i in range(SAMPLES):
            fh.seek(int(i * step))
            digest.update(fh.read(SAMPLE_BLOCK))
    return digest.hexdigest()[:16]


def output_files(stage_dir: Path) -> dict[str, dict[str, Any]]:
    """``{name: {"size", "digest"}}`` of the files directly in ``stage_dir`` (not its manifest, hidden files,
    temporary files or sub-folders), as :func:`write_manifest` records them for :func:`changed_file` to check."""
    out = {}
    for path in sorted(Path(stage_dir).iterdir()):
        if path.name != MANIFEST and not path.name.startswith(".") and path.is_file():
            out[path.name] = {"size": path.stat().st_size, "digest": fast_digest(path)}
    return out


def changed_file(stage_dir: Path, manifest: dict[str, Any]) -> tuple[Path, str] | None:
    """The first output file of a finished stage that no longer matches its manifest, with what happened to it
    (``"it is gone"``, ``"its size differs"``, ``"its content differs"``), or ``None`` when all match (or the manifest
    records no files: an older cmma)."""
    recorded = manifest.get("files")
    if not isinstance(recorded, dict):
        return None
    for name, facts in recorded.items():
        path = Path(stage_dir) / name
        try:
            size = path.stat().st_size
        except OSError:
            return path, "it is gone"
        if not isinstance(facts, dict) or size != facts.get("size"):
            return path, "its size differs"
        try:
            same = fast_digest(path) == facts.get("digest")
        except OSError:
            return path, "it cannot be read"
        if not same:
            return path, "its content differs"
    return None


def manifest_hash(stage_dir: Path) -> str:
    """The hash that later stages record for this stage's output (its manifest's bytes)."""
    return hashlib.sha256((stage_dir / MANIFEST).read_bytes()).hexdigest()[:16]


#: What every manifest holds (:func:`write_manifest`), with its type; a manifest without them is not one.
MANIFEST_KEYS: dict[str, type | tuple[type, ...]] = {
    "stage": str, "format": int, "config": dict, "config_hash": str, "inputs": dict, "rows": dict,
}
#: Keys a stage's readers rely on beyond those.
STAGE_KEYS: dict[str, dict[str, type | tuple[type, ...]]] = {"embed": {"modalities": list, "checkpoint": dict}}


def _load_manifest(stage_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(manifest, None)``; ``(None, None)`` when there is none; ``(None, why)`` when the file is not a whole
    manifest (cut short, not JSON, not an object, keys missing): such a stage did not finish."""
    path = Path(stage_dir) / MANIFEST
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})"
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # cut short, garbage, or nested too deeply to parse
        return None, "is cut short or is not JSON"
    if not isinstance(data, dict):
        return None, f"holds a JSON {type(data).__name__}, not a manifest"
    keys = {**MANIFEST_KEYS, **STAGE_KEYS.get(data.get("stage"), {})}  # type: ignore[arg-type]
    bad = [k for k, kind in keys.items() if not isinstance(data.get(k), kind) or isinstance(data.get(k), bool)]
    if bad:
        return None, f"lacks {', '.join(bad)} (or holds the wrong type)"
    return data, None


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    """The manifest of a finished stage, or ``None`` when the stage never finished (no manifest, or one that is
    not whole: a half-written or garbage manifest counts as not finished; :func:`require_stage` says which)."""
    return _load_manifest(stage_dir)[0]


def manifest_problem(stage_dir: Path) -> str | None:
    """Why ``stage_dir``'s manifest does not count (e.g. ``"is cut short or is not JSON"``), or ``None`` when it is
    whole or absent."""
    return _load_manifest(stage_dir)[1]


def _input_key(input_dir: Path) -> str:
    """Inputs are recorded under their own stage name (``fetch``, ``preprocess``, ...)."""
    manifest = read_manifest(input_dir)
    return manifest["stage"] if manifest else input_dir.name


def begin_stage(stage_dir: Path, lock: bool = True) -> None:
    """Mark ``stage_dir`` as being rewritten: its manifest goes first, so an interrupted run is not trusted.

    With ``lock``, the stage's write lock is taken first when this process does not hold it yet (a second writer is
    refused); it is then held until :func:`write_manifest` finishes the stage (or the process ends). ``lock=False``
    is for a process whose parent holds the lock (a spawned training rank). A workspace that cannot be written
    (read-only, disk full) is one sentence, before anything is changed.
    """
    if lock:
        _take(stage_dir, f"The stage folder {stage_dir}", block=False)
    _mkdir(stage_dir)
    try:
        (stage_dir / MANIFEST).unlink(missing_ok=True)
    except OSError as exc:
        raise (write_error(exc, stage_dir / MANIFEST) or exc) from None
    clear_orphans(stage_dir)


def clear_orphans(folder: Path) -> list[Path]:
    """Delete the temporary files (:func:`atomic`'s ``.<name>.tmp-<pid>``) that a killed writer left in ``folder``
    and its subfolders: those whose process is gone. Returns what was deleted."""
    gone = []
    for path in Path(folder).rglob(".*.tmp-*"):
        try:
            pid = int(path.name.rsplit(".tmp-", 1)[1])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid() or _alive(pid) or not path.is_file():
            continue
        try:
            path.unlink()
            gone.append(path)
        except OSError:
            pass
    return gone


def write_manifest(
    stage_dir: Path,
    stage: str,
    config: dict[str, Any],
    inputs: Iterable[Path] = (),
    rows: dict[str, int] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Finish a stage: write its manifest (last, after every table), with the size and digest of each file it
    holds (:func:`output_files`), so a file swapped afterwards is noticed (:func:`require_stage`)."""
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
    manifest["files"] = output_files(stage_dir)
    write_json(manifest, stage_dir / MANIFEST)
    _release_begun(stage_dir)
    return manifest


def reseal(stage_dir: Path) -> dict[str, Any]:
    """Record the files of a finished stage anew, after a deliberate edit by hand (a test, a repair): the stage's
    files are trusted as they are now. Its manifest changes, so the stages made from it are out of date."""
    manifest = read_manifest(stage_dir)
    if manifest is None:
        raise CMMAError(f"No finished stage in {stage_dir} to reseal.")
    manifest["files"] = output_files(stage_dir)
    write_json(manifest, Path(stage_dir) / MANIFEST)
    return manifest


def is_up_to_date(stage_dir: Path, config: dict[str, Any], inputs: Iterable[Path] = ()) -> bool:
    """True when ``stage_dir`` finished with this config, from inputs that have not changed since, and neither its
    files nor its inputs' files were replaced after they were written."""
    manifest = read_manifest(stage_dir)
    if manifest is None or manifest.get("format") != ARTIFACT_FORMAT:
        return False
    if manifest.get("config_hash") != config_hash(config):
        return False
    if changed_file(stage_dir, manifest) is not None:
        return False
    recorded = manifest.get("inputs", {})
    for p in inputs:
        theirs = read_manifest(p)
        if theirs is None or recorded.get(_input_key(p)) != manifest_hash(p) or changed_file(p, theirs) is not None:
            return False
    return True


def require_stage(stage_dir: Path, stage: str) -> dict[str, Any]:
    """The manifest of an input stage, or one sentence saying which command makes it: when it never finished, when
    its manifest is not whole (naming the file), when it is of an older layout, or when one of its files was
    replaced after it finished (naming the file)."""
    command = STAGE_COMMANDS.get(stage, f"cmma {stage}")
    if Path(stage_dir).parent.name == RUN_FOLDERS.get(stage):  # a run's stage: name the run
        command += f" --run {Path(stage_dir).name}"
    manifest, problem = _load_manifest(stage_dir)
    if problem is not None:
        raise CMMAError(f"The manifest {stage_dir / MANIFEST} {problem}, so `{stage}` did not finish there: run "
                        f"`{command} --force` to rebuild it.")
    if manifest is None:
        raise CMMAError(f"No finished `{stage}` output in {stage_dir}: run `{command}` first.")
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise CMMAError(
            f"{stage_dir} was written by cmma {manifest.get('version', '?')} in an older layout: "
            f"run `{command} --force` to rebuild it."
        )
    changed = changed_file(stage_dir, manifest)
    if changed is not None:
        path, what = changed
        raise CMMAError(f"{path} changed after `{stage}` finished ({what}: replaced or edited since, e.g. copied from "
                        f"another workspace), so it cannot be trusted: run `{command} --force` to rebuild it.")
    return manifest
