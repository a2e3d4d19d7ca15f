"""User-supplied data: folders of files named ``<material_id>.<suffix>`` (a modality names the suffixes it
reads, e.g. measured patterns or images). Only the folder's top level is read. A file whose name matches
no material, a second file for the same material or a file of another type becomes a reject, never an error.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cmma_cli.errors import CMMAError



def _files(folder: Path, option: str) -> list[Path]:
    if not folder.is_dir():
        raise CMMAError(f"The folder {folder} given to {option} does not exist: pass a folder of <material_id> files.")
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def scan_keyed_folder(
    folder: Path, suffixes: tuple[str, ...], known_ids: set[str], source: str, option: str
) -> tuple[dict[str, Path], list[dict[str, str]]]:
    """``{material_id: file}`` for the files in ``folder``, and reject rows for the ones not used."""
    found: dict[str, Path] = {}
    rejects: list[dict[str, str]] = []
    for path in _files(folder, option):
        reason = None
        if path.suffix.lower() not in suffixes:
            reason = f"unsupported file type {path.suffix or '(none)'} (expected one of {', '.join(suffixes)})"
        elif path.stem not in known_ids:
            reason = f"no material with id {path.stem!r} in raw/materials.parquet"
        elif path.stem in found:
            reason = f"a second file for {path.stem} (kept {found[path.stem].name})"
        if reason:
            rejects.append({"source": source, "item": str(path), "reason": reason})
        else:
            found[path.stem] = path.resolve()
    return found, rejects


def folder_fingerprint(folder: Path | None) -> str | None:
    """A hash of a folder's file names, sizes and times: a changed folder makes the stage rerun."""
    if folder is None or not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
