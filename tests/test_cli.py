"""The six commands through the Typer app, as a user types them: fetch -> preprocess -> train -> embed ->
evaluate -> retrieve on a slice of the built-in sample, then the mistakes that must be one sentence before
any data is read."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from cmma_cli.workspace import read_manifest

#: A model small enough that two epochs on 60 materials take seconds (structure + XRD: no text model to load).
TINY = ["--modalities", "structure,xrd", "--epochs", "2", "--batch-size", "16", "--embed-dim", "16",
        "--proj-hidden", "16", "--structure-layers", "1", "--num-rbf", "8", "--gpus", "0"]


def ok(result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


def one_sentence_error(result) -> str:
    """The error line of a failed command: exit status 2, ``Error: ...`` on one line, no traceback."""
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def test_the_six_commands_run_the_pipeline(cli, tmp_path):
    ws = tmp_path / "ws"

    # fetch: the short flags of the config's fields (-s, -e) and a settings flag (--limit)
    out = ok(cli("fetch", "-w", ws, "-s", "sample", "--limit", "60"))
    assert "materials" in out and "Done in" in out
    raw = read_manifest(ws / "raw")
    assert raw["source"] == "sample" and raw["rows"]["materials"] == 60 and raw["config"]["limit"] == 60
    assert "up to date" in ok(cli("fetch", "-w", ws, "--source", "sample", "--limit", "60"))

    # preprocess
    out = ok(cli("preprocess", "-w", ws))
    assert "Preprocessed 60 materials" in out
    assert (ws / "processed" / "materials.parquet").is_file() and (ws / "processed" / "splits.parquet").is_file()

    # train: settings from a TOML file (flat and nested modality keys), the command line over it
    config = tmp_path / "small.toml"
    config.write_text('[train]\nepochs = 5\nxrd_channels = 4\nxrd_out_dim = 16\n\n[train.structure]\nhidden = 16\n')
    out = ok(cli("train", "-w", ws, "--config", config, "--run", "tiny", *TINY))
    assert "Training structure,xrd (structure-xrd) on " in out and "epochs 1-2" in out
    assert "epoch 2: train loss" in out and "best.pt: epoch" in out
    run = ws / "runs" / "tiny"
    with (run / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"train_loss", "val_loss", "val_r1", "val_r1_chance", "val_r1_structure->xrd", "lr", "temperature",
            "train_structure-xrd", "train_materials_per_s", "epoch_seconds"} <= set(rows[0])
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == ["epoch-001.pt", "epoch-002.pt"]
    assert (run / "best.pt").is_file() and (run / "last.pt").is_file()
    trained = read_manifest(run)
    assert trained["config"]["epochs"] == 2 and trained["config"]["xrd"]["channels"] == 4
    assert trained["config"]["structure"]["hidden"] == 16 and trained["spec"]["embed_dim"] == 16
    assert not list(run.rglob(".*.tmp*"))  # every file was renamed into place
    # the run's config.toml trains the same model again
    again = ok(cli("train", "-w", ws, "--config", run / "config.toml", "--run", "again", "--epochs", "1"))
    assert "epochs 1-1" in again and read_manifest(ws / "runs" / "again")["spec"] == trained["spec"]

    # embed (the newest finished run unless --run)
    ok(cli("embed", "-w", ws, "--run", "tiny"))
    embedded = ws / "embeddings" / "tiny"
    assert read_manifest(embedded) is not None
    assert (embedded / "structure.parquet").is_file() and (embedded / "unified.parquet").is_file()

    # evaluate: the retrieval section only
    ok(cli("evaluate", "-w", ws, "--run", "tiny", "--sections", "retrieval"))
    report = ws / "reports" / "tiny"
    assert (report / "report.md").is_file()
    metrics = json.loads((report / "metrics.json").read_text())
    assert "structure->xrd" in json.dumps(metrics)

    # retrieve: a stored material finds itself first
    material = pq.read_table(ws / "processed" / "materials.parquet", columns=["material_id"])["material_id"][0].as_py()
    result = cli("retrieve", "-w", ws, "--run", "tiny", "--material", material, "-k", "3", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["run"] == "tiny" and [r["rank"] for r in doc["results"]] == [1, 2, 3]
    assert doc["results"][0]["material_id"] == material


# ----------------------------------------------------------------------------------------------- mistakes


def test_a_bad_choice_is_refused_before_any_data_is_read(cli, tmp_path):
    empty = tmp_path / "empty"  # no raw/, no processed/: reading anything would fail differently
    line = one_sentence_error(cli("train", "-w", empty, "--structure-encoder", "schnett"))
    assert line == ("Error: --structure-encoder must be one of schnet, cgcnn, painn, chgnet, sevenn or a class given as "
                    "package.module:Class, not 'schnett'.")
    line = one_sentence_error(cli("train", "-w", empty, "--objective", "regress"))
    assert "--objective must be one of contrastive, predict, contrastive+predict, not 'regress'." in line
    line = one_sentence_error(cli("preprocess", "-w", empty, "--split-by", "element"))
    assert "--split-by must be one of composition, chemsys, not 'element'." in line
    line = one_sentence_error(cli("evaluate", "-w", empty, "--sections", "retrieval,retreival"))
    assert "--sections must name some of" in line and "retreival" in line
    line = one_sentence_error(cli("fetch", "-w", empty, "--source", "nomad"))
    assert line == "Error: --source must be one of sample, mp, local, not 'nomad'."
    assert not empty.exists()


def test_a_config_file_value_of_the_wrong_type_is_one_sentence(cli, tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[train]\nepochs = "ten"\n')
    line = one_sentence_error(cli("train", "-w", tmp_path / "ws", "--config", config))
    assert line == f"Error: Config file {config}: [train] epochs must be a whole number, not 'ten'."
    config.write_text("[train]\nepoch = 3\n")
    assert "unknown [train] keys ['epoch']" in one_sentence_error(cli("train", "-w", tmp_path / "ws", "--config", config))
    config.write_text("[fetch]\nlimit = 2.5\n")
    line = one_sentence_error(cli("fetch", "-w", tmp_path / "ws", "--config", config))
    assert line == f"Error: Config file {config}: [fetch] limit must be a whole number, not 2.5."


def test_fetch_takes_repeated_short_element_flags_and_refuses_paths_with_another_source(cli, tmp_path):
    ws = tmp_path / "ws"
    ok(cli("fetch", "-w", ws, "-s", "sample", "-e", "O", "-e", "Si", "--limit", "3"))
    manifest = read_manifest(ws / "raw")
    assert manifest["config"]["elements"] == ["O", "Si"] and manifest["rows"]["materials"] <= 3
    line = one_sentence_error(cli("fetch", "-w", tmp_path / "other", "-s", "sample", tmp_path))
    assert "only read with --source local" in line


def test_help_is_fast_because_it_imports_no_heavy_library():
    """``cmma --help`` and ``cmma train --help`` build every option from the registry without torch."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from cmma_cli.cli import app\n"
        "for args in ([\"--help\"], [\"train\", \"--help\"], [\"fetch\", \"--help\"]):\n"
        "    result = CliRunner().invoke(app, args)\n"
        "    assert result.exit_code == 0, result.output\n"
        "heavy = ('torch', 'pymatgen', 'faiss', 'sklearn', 'transformers', 'sentence_transformers')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]", out.stderr
