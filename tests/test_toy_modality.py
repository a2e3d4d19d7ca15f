"""A new modality is ONE module plus ONE registry line: the toy ``rdf`` modality (tests/toy_modality.py, a 1-D
spectrum per material read from a folder of files) goes through preprocess -> train -> embed -> retrieve ->
evaluate without any other file knowing it exists."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from cmma_cli.modalities import REGISTRY, register


def write_rdf_files(ws, folder, limit: int | None = None) -> list[str]:
    """``<material_id>.rdf`` (a radial distribution histogram, r and g(r)) for the fetched structures."""
    from pymatgen.core import Structure

    raw = pq.read_table(ws.raw / "materials.parquet", columns=["material_id", "structure"]).to_pylist()[:limit]
    folder.mkdir()
    written = []
    for row in raw:
        structure = Structure.from_dict(json.loads(row["structure"]))
        _, _, _, distances = structure.get_neighbor_list(8.0)
        counts, edges = np.histogram(distances, bins=64, range=(0.0, 8.0))
        centres = (edges[:-1] + edges[1:]) / 2
        g = counts / np.maximum(centres**2, 1e-3) / len(structure)
        if "/" in row["material_id"] or len(written) % 7 == 6:
            written.append(None)  # no file: these materials simply lack the modality
            continue
        np.savetxt(folder / f"{row['material_id']}.rdf", np.column_stack([centres, g]))
        written.append(row["material_id"])
    return [m for m in written if m is not None]


@pytest.fixture
def toy_registered():
    from toy_modality import RDFModality

    register(RDFModality())  # the one registry line
    yield REGISTRY["rdf"]
    REGISTRY.pop("rdf")


def test_a_package_registers_a_modality_with_one_entry_point(tmp_path, monkeypatch):
    """What another package does: one line under [project.entry-points."cmma.modalities"] in its pyproject."""
    from cmma_cli.config import TrainConfig
    from cmma_cli.modalities import load_plugins

    dist = tmp_path / "toy_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[cmma.modalities]\nrdf = toy_modality:RDFModality\n"
                                           "broken = toy_modality:NoSuchClass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.warns(UserWarning, match="plug-in 'broken' .* could not be loaded"):
            assert load_plugins() == ["rdf"]
        assert TrainConfig(rdf_hidden=8).rdf.hidden == 8  # its settings are options now
    finally:
        REGISTRY.pop("rdf", None)


@pytest.mark.slow
def test_a_toy_modality_runs_through_every_stage(toy_registered, tmp_path, capsys):
    from cmma_cli.config import EmbedConfig, EvaluateConfig, FetchConfig, PreprocessConfig, TrainConfig
    from cmma_cli.embed import run_embed
    from cmma_cli.evaluate.pipeline import run_evaluate
    from cmma_cli.fetch import run_fetch
    from cmma_cli.preprocess.pipeline import run_preprocess
    from cmma_cli.train import run_train
    from cmma_cli.workspace import Workspace, read_manifest

    ws = Workspace(tmp_path / "ws")
    run_fetch(ws, FetchConfig(source="sample"), api_key=None)
    with_rdf = write_rdf_files(ws, tmp_path / "rdf")
    assert len(with_rdf) > 200

    # preprocess: its folder option, its column, its count in the manifest
    manifest = run_preprocess(ws, PreprocessConfig(workers=1, xrd=False, rdf_dir=str(tmp_path / "rdf")))
    assert manifest["modalities"]["rdf"] == len(with_rdf)
    assert manifest["config"]["rdf"]["dir"] == str((tmp_path / "rdf").resolve())
    column = pq.read_table(ws.processed / "materials.parquet", columns=["material_id", "rdf"]).to_pylist()
    assert sum(r["rdf"] is not None for r in column) == len(with_rdf)
    assert all(len(r["rdf"]) == 64 for r in column if r["rdf"] is not None)

    # train: its settings section, its encoder in the spec
    cfg = TrainConfig(modalities=["structure", "rdf"], epochs=2, batch_size=32, embed_dim=16, proj_hidden=32,
                      structure_hidden=16, structure_layers=1, num_rbf=8, rdf_hidden=16)
    assert cfg.rdf.hidden == 16
    trained = run_train(ws, cfg, run="toy")
    assert trained["spec"]["encoders"]["rdf"] == {"points": 64, "hidden": 16, "scale": "sqrt"}
    assert trained["last"]["val_r1_structure->rdf"] >= 0

    # embed: its own table and index
    embedded = run_embed(ws, EmbedConfig(run="toy"))
    assert embedded["modalities"] == ["structure", "rdf"]
    assert embedded["counts"]["rdf"] == len(with_rdf)
    assert (ws.embeddings_dir("toy") / "rdf.faiss").is_file()

    # retrieve: its own query option, searched against the structures (and its own index)
    from cmma_cli.config import RetrieveConfig
    from cmma_cli.retrieve import Query, search

    query = tmp_path / "rdf" / f"{with_rdf[0]}.rdf"
    result = search(ws, Query(rdf=query), RetrieveConfig(run="toy", k=5))
    assert (result.source, result.target, len(result.rows)) == ("rdf", "structure", 5)
    itself = search(ws, Query(rdf=query), RetrieveConfig(run="toy", target="rdf", k=1))
    assert itself.rows[0]["material_id"] == with_rdf[0] and itself.rows[0]["score"] > 0.999

    # embed --input: a folder of its files
    from cmma_cli.embed_inputs import embed_inputs

    inputs = embed_inputs(ws, EmbedConfig(run="toy"), [tmp_path / "rdf"])
    assert inputs["counts"]["rdf"] == len(with_rdf)

    # evaluate: retrieval between the toy and the structure
    metrics = run_evaluate(ws, EvaluateConfig(run="toy", sections=["retrieval"]))
    assert {"rdf->structure", "structure->rdf"} <= set(metrics["retrieval"]["pairs"])
    assert read_manifest(ws.reports_dir("toy"))["stage"] == "evaluate"


def test_the_command_line_offers_a_registered_modalitys_options(toy_registered):
    """Options come from the registry: the toy's settings and query appear once it is registered."""
    import importlib

    from typer.testing import CliRunner

    import cmma_cli.cli

    try:
        app = importlib.reload(cmma_cli.cli).app  # the command line is built from the registry when imported
        runner = CliRunner()
        assert "--rdf-dir" in runner.invoke(app, ["preprocess", "--help"], terminal_width=200).output
        assert "--rdf-hidden" in runner.invoke(app, ["train", "--help"], terminal_width=200).output
        assert "--rdf " in runner.invoke(app, ["retrieve", "--help"], terminal_width=200).output
        bad = runner.invoke(app, ["train", "-w", "/nonexistent/ws", "--rdf-scale", "log"])
        assert bad.exit_code == 2 and "--rdf-scale must be one of sqrt, linear, not 'log'." in bad.output
    finally:
        REGISTRY.pop("rdf")
        importlib.reload(cmma_cli.cli)
        REGISTRY["rdf"] = toy_registered  # the fixture removes it
