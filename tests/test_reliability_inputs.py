"""Bad inputs end in one sentence with exit 2, never a traceback (issue #15, item 10), and nothing written is lost.

A truncated or garbage ``manifest.json`` names the file and the command that rebuilds it (and counts as a stage
that did not finish); a read-only workspace or a full disk says what could not be written and what to do, leaving
the previous files whole and no temporary file behind; JSON nested 100,000 deep is one sentence; and a stage file
swapped after the stage finished is noticed by the next stage. Each test failed before its fix.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import textwrap
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cmma_cli import workspace as wsmod
from cmma_cli.errors import CMMAError
from cmma_cli.workspace import (MANIFEST, ParquetStream, Workspace, atomic, fast_digest, is_up_to_date, read_manifest,
                                require_stage, reseal, write_table)

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0

CIF = textwrap.dedent("""\
    data_NaCl
    _symmetry_space_group_name_H-M   'P 1'
    _cell_length_a   5.64
    _cell_length_b   5.64
    _cell_length_c   5.64
    _cell_angle_alpha   90
    _cell_angle_beta   90
    _cell_angle_gamma   90
    loop_
     _symmetry_equiv_pos_as_xyz
      'x, y, z'
    loop_
     _atom_site_type_symbol
     _atom_site_label
     _atom_site_fract_x
     _atom_site_fract_y
     _atom_site_fract_z
     _atom_site_occupancy
      Na  Na0  0  0  0  1
      Cl  Cl1  0.5  0.5  0.5  1
    """)

DEEP = "[" * 100_000 + "]" * 100_000


def one_sentence(result, *parts: str) -> str:
    """The CLI's output as one line; asserts exit 2, no traceback and every part (a regex) in it."""
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in text and "Error:" in text, text
    for part in parts:
        assert re.search(part, text), (part, text)
    return text


@pytest.fixture
def ws(embedded_sample, tmp_path) -> Workspace:
    return embedded_sample.copy(tmp_path / "ws")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".tmp-" in p.name]


# ---------------------------------------------------------------------------- truncated / garbage manifests

GARBAGE = {
    "cut": lambda text: text[: len(text) // 2],
    "list": lambda text: "[1, 2]\n",
    "keys": lambda text: json.dumps({"stage": json.loads(text)["stage"]}),
    "deep": lambda text: DEEP,
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_a_garbage_manifest_counts_as_not_finished_and_require_stage_names_it(ws, kind):
    stages = {"fetch": ws.raw, "preprocess": ws.processed, "train": ws.run_dir("sample"),
              "embed": ws.embeddings_dir("sample"), "evaluate": ws.reports_dir("sample")}
    for stage, folder in stages.items():
        folder.mkdir(parents=True, exist_ok=True)
        manifest = folder / MANIFEST
        text = manifest.read_text() if manifest.exists() else json.dumps({"stage": stage})
        manifest.write_text(GARBAGE[kind](text))
        assert read_manifest(folder) is None  # a half-written manifest: the stage did not finish
        assert not is_up_to_date(folder, {})
        rebuild = {"fetch": "cmma fetch --force", "preprocess": "cmma preprocess --force"}.get(
            stage, f"cmma {stage} --run sample --force")
        with pytest.raises(CMMAError, match=re.escape(str(manifest)) + r" (is cut short|holds a JSON|lacks).*"
                                            + re.escape(f"`{rebuild}`")):
            require_stage(folder, stage)
    assert ws.finished("train") == [] and ws.finished("embed") == []


def test_garbage_manifests_are_one_sentence_on_the_command_line(ws, cli):
    raw = ws.raw / MANIFEST
    raw_text = raw.read_text()
    raw.write_text(raw_text[:40])  # cut mid-file
    one_sentence(cli("preprocess", "-w", ws.root), r"raw/manifest\.json is cut short", r"cmma fetch --force")
    raw.write_text(raw_text)

    processed = ws.processed / MANIFEST
    processed_text = processed.read_text()
    processed.write_text("[1,2]")
    one_sentence(cli("embed", "-w", ws.root, "--force"), r"processed/manifest\.json holds a JSON list",
                 r"cmma preprocess --force")
    processed.write_text(processed_text)

    run = ws.run_dir("sample") / MANIFEST
    run_text = run.read_text()
    run.write_text(json.dumps({"stage": "train"}))  # keys missing
    one_sentence(cli("embed", "-w", ws.root, "--run", "sample", "--force"),
                 r"runs/sample/manifest\.json lacks", r"cmma train --run sample")
    run.write_text(run_text)

    emb = ws.embeddings_dir("sample") / MANIFEST
    emb_text = emb.read_text()
    emb.write_text(DEEP)
    one_sentence(cli("retrieve", "-w", ws.root, "--run", "sample", "a solid-state synthesis"),
                 r"embeddings/sample/manifest\.json is cut short or is not JSON", r"cmma embed --run sample --force")
    emb.write_text(json.dumps({k: v for k, v in json.loads(emb_text).items() if k != "modalities"}))
    one_sentence(cli("retrieve", "-w", ws.root, "--run", "sample", "a solid-state synthesis"),
                 r"embeddings/sample/manifest\.json lacks modalities", r"cmma embed --run sample --force")
    one_sentence(cli("evaluate", "-w", ws.root, "--run", "sample", "--sections", "retrieval"),
                 r"embeddings/sample/manifest\.json lacks modalities", r"cmma embed --run sample --force")


# --------------------------------------------------------------------------------- read-only, disk full


def _deny_writes_below(monkeypatch, folder: Path, err: int = errno.EACCES) -> None:
    """As root (who ignores permissions) a read-only ``folder``: renaming or opening a file into it is refused."""
    real_replace, real_open = os.replace, os.open
    folder = str(folder.resolve())

    def inside(path) -> bool:
        return str(Path(os.fsdecode(path)).resolve()).startswith(folder)

    def replace(src, dst, *args, **kwargs):
        if inside(dst):
            raise PermissionError(err, os.strerror(err), os.fsdecode(dst))
        return real_replace(src, dst, *args, **kwargs)

    def open_(path, flags, *args, **kwargs):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(err, os.strerror(err), os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "open", open_)


def test_a_read_only_stage_folder_is_one_sentence_and_keeps_the_files(ws, cli, monkeypatch):
    before = snapshot(ws.raw)
    if ROOT_USER:
        _deny_writes_below(monkeypatch, ws.raw)
    else:
        ws.raw.chmod(0o555)
    try:
        text = one_sentence(cli("fetch", "-w", ws.root, "--force"), r"Could not write .*raw", r"permission denied",
                            r"writable workspace with -w")
    finally:
        ws.raw.chmod(0o755)
    assert text.split("Error:", 1)[1].strip().count(". ") == 0  # one sentence
    after = snapshot(ws.raw)
    assert {k: v for k, v in after.items() if k != MANIFEST} == {k: v for k, v in before.items() if k != MANIFEST}
    assert no_temporaries(ws.raw)


def test_a_read_only_workspace_is_one_sentence_before_anything_changes(ws, cli, monkeypatch):
    before = snapshot(ws.raw)
    if ROOT_USER:
        _deny_writes_below(monkeypatch, ws.root)
    else:
        ws.root.chmod(0o555)
        ws.raw.chmod(0o555)
    try:
        one_sentence(cli("fetch", "-w", ws.root, "--force"), r"Could not write", r"-w")
    finally:
        ws.root.chmod(0o755)
        ws.raw.chmod(0o755)
    assert snapshot(ws.raw) == before  # the manifest too: the stage still counts as finished
    assert read_manifest(ws.raw) is not None and no_temporaries(ws.root)


def test_a_full_disk_is_one_sentence_and_keeps_the_previous_files(ws, cli, monkeypatch):
    before = snapshot(ws.raw)
    real = pq.write_table

    def full(table, where, *args, **kwargs):  # half the file reaches the disk, then it is full
        real(table, where, *args, **kwargs)
        Path(where).write_bytes(Path(where).read_bytes()[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))

    monkeypatch.setattr(wsmod.pq, "write_table", full)
    text = one_sentence(cli("fetch", "-w", ws.root, "--force"), r"Could not write .*raw/materials\.parquet",
                        r"the disk is full", r"free some space", r"-w")
    assert "Traceback" not in text
    after = snapshot(ws.raw)
    assert {k: v for k, v in after.items() if k != MANIFEST} == {k: v for k, v in before.items() if k != MANIFEST}
    assert no_temporaries(ws.root)


def test_atomic_writers_leave_no_temporary_file_when_the_disk_fills(tmp_path, monkeypatch):
    target = tmp_path / "t.parquet"
    write_table(pd.DataFrame({"a": [1, 2, 3]}), target)
    old = target.read_bytes()

    # the block fails (a writer out of space): the temporary file goes, the old file stays
    with pytest.raises(CMMAError, match=r"Could not write .*t\.parquet \(the disk is full\)"):
        with atomic(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    # the rename fails (read-only folder): the temporary file goes too
    monkeypatch.setattr(os, "replace", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only")))
    with pytest.raises(CMMAError, match=r"read-only.*-w"):
        write_table(pd.DataFrame({"a": [4]}), target)
    monkeypatch.undo()
    # a Parquet file written row group by row group (preprocess): out of space mid-way
    stream = ParquetStream(target, pa.schema([("a", pa.int64())]))
    stream.write(pa.table({"a": [9, 9]}))
    monkeypatch.setattr(pq.ParquetWriter, "write_table",
                        lambda self, table, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(CMMAError, match="the disk is full"):
        try:
            stream.write(pa.table({"a": [1]}))
        except BaseException:
            stream.abort()
            raise
    assert target.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]


# ----------------------------------------------------------------------------------------- deep JSON


def test_deeply_nested_recipe_json_is_one_sentence(tmp_path, cli):
    folder = tmp_path / "cifs"
    folder.mkdir()
    (folder / "nacl.cif").write_text(CIF)
    deep = tmp_path / "recipes.json"
    deep.write_text(DEEP)
    one_sentence(cli("fetch", "-w", tmp_path / "ws", "--source", "local", folder, deep),
                 r"Could not read recipes from .*recipes\.json", r"nested too deeply")
    lines = tmp_path / "recipes.jsonl"
    lines.write_text('{"doi": "x"}\n' + "{" * 0 + DEEP + "\n")
    one_sentence(cli("fetch", "-w", tmp_path / "ws", "--source", "local", folder, lines),
                 r"recipes\.jsonl", r"line 2 is nested too deeply")


def test_deeply_nested_embed_input_is_one_sentence(ws, cli, tmp_path):
    deep = tmp_path / "texts.json"
    deep.write_text(DEEP)
    one_sentence(cli("embed", "-w", ws.root, "--run", "sample", "--input", deep), r"texts\.json",
                 r"nested too deeply")


# -------------------------------------------------------------------------------------- swapped files


def test_a_swapped_processed_table_is_refused_naming_it(ws, cli):
    target = ws.processed / "materials.parquet"
    shutil.copyfile(ws.raw / "materials.parquet", target)  # another table put in its place
    assert not is_up_to_date(ws.processed, read_manifest(ws.processed)["config"], [ws.raw])
    one_sentence(cli("embed", "-w", ws.root, "--force"), r"processed/materials\.parquet changed after `preprocess`",
                 r"cmma preprocess --force")
    one_sentence(cli("train", "-w", ws.root, "--run", "again", "--epochs", "1"),
                 r"processed/materials\.parquet changed", r"cmma preprocess --force")


def test_a_swapped_embeddings_table_is_refused_naming_it(ws, cli):
    out = ws.embeddings_dir("sample")
    unified = (out / "unified.parquet").read_bytes()
    shutil.copyfile(out / "structure.parquet", out / "unified.parquet")
    one_sentence(cli("retrieve", "-w", ws.root, "--run", "sample", "a solid-state synthesis"),
                 r"embeddings/sample/unified\.parquet changed after `embed`", r"cmma embed --run sample --force")
    one_sentence(cli("evaluate", "-w", ws.root, "--run", "sample", "--sections", "retrieval"),
                 r"unified\.parquet changed", r"cmma embed --run sample --force")
    # the same size, other bytes (a copy from a workspace with the same shapes) is noticed too
    changed = bytearray(unified)
    changed[len(changed) // 2] ^= 0xFF
    (out / "unified.parquet").write_bytes(bytes(changed))
    with pytest.raises(CMMAError, match=r"unified\.parquet changed .*\(its content differs"):
        require_stage(out, "embed")
    (out / "unified.parquet").write_bytes(unified)
    assert require_stage(out, "embed")
    (out / "structure.faiss").unlink()
    with pytest.raises(CMMAError, match=r"structure\.faiss changed .*\(it is gone"):
        require_stage(out, "embed")


def test_a_resealed_edit_is_trusted(ws):
    splits = ws.processed / "splits.parquet"
    pd.read_parquet(splits).to_parquet(splits)
    with pytest.raises(CMMAError, match="splits.parquet changed"):
        require_stage(ws.processed, "preprocess")
    reseal(ws.processed)
    assert require_stage(ws.processed, "preprocess")["files"]["splits.parquet"]["size"] == splits.stat().st_size


def test_the_fast_digest_costs_the_same_for_any_size_and_sees_a_swap(tmp_path):
    big = tmp_path / "big.bin"
    data = os.urandom(20 << 20)
    big.write_bytes(data)
    first = fast_digest(big)
    for at in (0, len(data) - 1):  # the first and last blocks are always read
        changed = bytearray(data)
        changed[at] ^= 1
        big.write_bytes(bytes(changed))
        assert fast_digest(big) != first, at
    big.write_bytes(os.urandom(len(data)))  # another file of the same size
    assert fast_digest(big) != first
    big.write_bytes(data + b"x")
    assert fast_digest(big) != first
    big.write_bytes(data)
    assert fast_digest(big) == first
