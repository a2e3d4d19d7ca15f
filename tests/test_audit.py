"""Audit fixes (#14 parts 5-6, #15.12): each test fails with the bug it guards against planted back."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer

from cmma_cli.config import EvaluateConfig, RetrieveConfig
from cmma_cli.errors import CMMAError
from cmma_cli.workspace import Workspace

RUN = "sample"


@pytest.fixture(scope="module")
def ws(embedded_sample, tmp_path_factory) -> Workspace:
    """A copy of the session's embedded sample that these tests may write reports and input embeddings into."""
    return embedded_sample.copy(tmp_path_factory.mktemp("audit") / "ws")


# --------------------------------------------------------------------------------- baselines on mixed data


def test_baseline_labels_of_mixed_data_are_none_where_unknown_never_nan():
    """A CSV fetched with a folder of CIFs: crystal systems are strings, None, NaN (pandas 3 str dtype too)."""
    from types import SimpleNamespace

    from cmma_cli.evaluate.baselines import _targets

    materials = pd.DataFrame({
        "material_id": ["a", "b", "c", "d", "e"],
        "crystal_system": pd.array(["cubic", None, "hexagonal", np.nan, "cubic"], dtype="str"),
        "is_stable": [True, None, np.nan, False, True],
        "split": ["train", "train", "train", "train", "test"],
    })
    targets = {t.name: t for t in _targets(SimpleNamespace(materials=materials, numeric_properties=[]),
                                           EvaluateConfig(), None)}
    system = targets["crystal_system"]
    assert system.classes == ["cubic", "hexagonal"]
    assert system.values.tolist() == ["cubic", None, "hexagonal", None, "cubic"]
    assert system.known(system.values.to_numpy()).tolist() == [True, False, True, False, True]
    assert targets["stable"].classes == ["False", "True"]
    assert targets["stable"].known(targets["stable"].values.to_numpy()).tolist() == [True, False, False, True, True]


# ------------------------------------------------------------------------------ square brackets in errors


def test_error_messages_keep_their_square_brackets(cli, tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text("[train]\nepochz = 3\n")
    result = cli("train", "-w", tmp_path / "ws", "--config", config)
    assert result.exit_code == 2
    assert "unknown [train] keys ['epochz']" in " ".join(result.output.split())

    from cmma_cli.cli import _friendly
    from cmma_cli.modalities.image import _timm

    try:
        _timm()
        hint = None
    except CMMAError as exc:
        hint = exc
    if hint is None:
        pytest.skip("timm is installed here: the image modality needs no hint")

    @_friendly
    def command():
        raise hint

    with pytest.raises(typer.Exit):
        command()
    assert "pip install 'cmma[images]'" in " ".join(capsys.readouterr().err.split())


# --------------------------------------------------------------------------------------------- retrieve


def test_retrieve_never_reports_more_loading_than_the_whole_command(embedded_sample):
    from cmma_cli.retrieve import Query, Retriever

    started = time.perf_counter()
    result = Retriever(embedded_sample.ws, RUN).query(Query(text="cubic rock salt structure"), k=3)
    wall_ms = (time.perf_counter() - started) * 1000
    t = result.timing_ms
    assert t["load"] + t["encode"] + t["search"] <= wall_ms + 1.0


def test_retrieve_messages_say_what_happened(embedded_sample, tmp_path, monkeypatch, capsys):
    import cmma_cli.retrieve as R

    # a wrong -w folder is not "no embeddings yet"
    (tmp_path / "notes.txt").write_text("not a workspace")
    for root in (tmp_path / "typo", tmp_path):
        with pytest.raises(CMMAError) as err:
            R.Retriever(Workspace(root))
        assert "no embeddings" not in str(err.value) and "--workspace/-w" in str(err.value)
    # an empty answer without filters does not ask to loosen filters nobody gave
    empty = R.Result(RUN, {"kind": "text", "value": "x"}, "text", "structure", 5, [], 0, [])
    monkeypatch.setattr(R, "search", lambda *a, **k: empty)
    R.run_retrieve(embedded_sample.ws, R.Query(text="x"), RetrieveConfig(run=RUN))
    said = " ".join(capsys.readouterr().err.split())
    assert "loosen" not in said and "filter" not in said and "empty" in said


def test_embed_suggests_a_query_the_run_can_answer(capsys):
    from cmma_cli.embed import _summary

    facts = {"kind": "flat", "rows": 3}
    _summary(Path("out"), {"structure": facts, "xrd": facts, "unified": facts}, 3, 1.0)
    said = " ".join(capsys.readouterr().err.split())
    assert "a text query" not in said and "cmma retrieve --structure FILE.cif" in said
    _summary(Path("out"), {"structure": facts, "text": facts, "unified": facts}, 3, 1.0)
    assert 'cmma retrieve "a text query"' in " ".join(capsys.readouterr().err.split())


def test_result_tables_never_cut_ids_or_pair_names(monkeypatch):
    from rich.console import Console

    from cmma_cli.evaluate.report import print_summary
    from cmma_cli.retrieve import Result, render

    long_id = "aflow:A2B3C6_oP22_58_ab_c_3g:XyZ"
    rows = [{"rank": 1, "score": 0.98765, "material_id": long_id, "formula": "Li2Fe3(PO4)6", "crystal_system":
             "orthorhombic", "band_gap": 1.23, "formation_energy_per_atom": -2.345, "energy_above_hull": 0.012}]
    result = Result(RUN, {"kind": "text", "value": "x"}, "text", "structure", 5, [], 300, rows)
    out = Console(width=80, record=True, file=open("/dev/null", "w"))
    out.print(render(result, width=80))
    text = out.export_text()
    assert long_id in text and "Li2Fe3(PO4)6" in text and "…" not in text

    from cmma_cli.console import console

    pairs = {f"{a}->{b}": {"queries": 30, "mrr": 0.5, "chance_mrr": 0.1, "median_rank": 2.0, "chance_median_rank": 15,
                           **{f"recall@{k}": 0.5 for k in (1, 5, 10)}, **{f"chance_recall@{k}": 0.1 for k in (1, 5, 10)}}
             for a, b in (("structure", "text"), ("structure", "xrd"))}
    metrics = {"run": {"ks": [1, 5, 10]}, "retrieval": {"pairs": pairs}}
    # the shared console, narrowed and recorded for this test only: monkeypatch puts back its own (unset) file and
    # width, so later commands print to whatever stderr is current again
    with open(os.devnull, "w") as devnull:
        monkeypatch.setattr(console, "_file", devnull)
        monkeypatch.setattr(console, "_width", 60)
        monkeypatch.setattr(console, "record", True)
        print_summary(metrics, "report.md")
        text = console.export_text()
    assert "structure->text" in text and "structure->xrd" in text


def test_retrieve_searches_what_embed_input_embedded(ws, tmp_path):
    import pyarrow.parquet as pq
    from pymatgen.core import Structure
    from pymatgen.io.cif import CifWriter

    from cmma_cli.config import EmbedConfig
    from cmma_cli.embed_inputs import embed_inputs
    from cmma_cli.retrieve import Query, Retriever

    raw = pq.read_table(ws.raw / "materials.parquet", columns=["material_id", "structure"]).to_pandas()
    folder = tmp_path / "mine"
    folder.mkdir()
    for i, text in enumerate(raw["structure"].iloc[[3, 40]]):
        (folder / f"mine{i}.cif").write_text(str(CifWriter(Structure.from_dict(json.loads(text)))))
    embed_inputs(ws, EmbedConfig(run=RUN), [folder])
    retriever = Retriever(ws, RUN)
    assert retriever.inputs() == ["mine"]
    result = retriever.query(Query(structure=folder / "mine1.cif"), target="inputs/mine", k=2)
    assert result.target == "inputs/mine/structure" and result.index_size == 2
    assert result.rows[0]["material_id"] == "mine1" and result.rows[0]["score"] > 0.999
    unified = retriever.query(Query(structure=folder / "mine0.cif"), target="inputs/mine/unified", k=1)
    assert unified.rows[0]["material_id"] == "mine0"
    with pytest.raises(CMMAError, match=r"no embedded inputs named 'theirs' .*it has: inputs/mine"):
        retriever.query(Query(structure=folder / "mine0.cif"), target="inputs/theirs")
    from cmma_cli.cli import app
    from typer.testing import CliRunner

    help_text = " ".join(CliRunner().invoke(app, ["retrieve", "--help"], env={"COLUMNS": "200"}).output.split())
    assert "inputs/NAME" in help_text


# ------------------------------------------------------------------------------------------- text model


def test_an_unreachable_text_model_fails_in_seconds_with_one_sentence(monkeypatch):
    from cmma_cli.modalities.text.encoder import load_sentence_model

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://cmma-hub.invalid")  # nothing answers there
    started = time.perf_counter()
    with pytest.raises(CMMAError) as err:
        load_sentence_model("cmma-test/not-a-cached-model")
    assert time.perf_counter() - started < 15
    message = str(err.value)
    assert "not in the Hugging Face cache" in message and "cmma-hub.invalid" in message
    assert message.count(". ") == 0  # one sentence


# --------------------------------------------------------------------------------------------- evaluate


def _pngs_whole(report: Path) -> list[str]:
    """The figures report.md links, each checked to exist and to be a whole PNG (ends with its IEND chunk)."""
    import re

    names = re.findall(r"\]\(figures/([^)]+)\)", report.read_text())
    for name in names:
        data = (report.parent / "figures" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[-8:-4] == b"IEND", name
    return names


def test_a_partial_evaluate_keeps_what_it_did_not_recompute_and_the_report_says_so(ws, monkeypatch):
    from cmma_cli.evaluate.pipeline import run_evaluate

    out = ws.reports_dir(RUN)
    run_evaluate(ws, EvaluateConfig(run=RUN, sections=["latent"], maps=["tsne"]), force=True)
    figures = _pngs_whole(out / "report.md")
    assert figures

    monkeypatch.chdir(ws.root.parent)  # the workspace is ./ws from here
    metrics = run_evaluate(ws, EvaluateConfig(run=RUN, sections=["probes", "retrieval"]), force=True)
    report = (out / "report.md").read_text()
    assert "## Latent space" in report and "## Property probes" in report and "## Cross-modal retrieval" in report
    assert _pngs_whole(out / "report.md") == figures  # still linked, still there
    assert metrics["carried"] == ["latent"] and metrics["latent"]["carried"] and not metrics["latent"]["stale"]
    assert "Kept from an earlier `cmma evaluate`" in report

    # units, hyperparameters, seeds, a bootstrap spread, and no absolute path in the reproduce line
    assert "MAE (eV/atom)" in report and "MAE (g/cm³)" in report and "R@1 (share)" in report
    assert "## Settings" in report and "| batch_size | 32 |" in report and "training seed 0" in report
    pair = metrics["retrieval"]["pairs"]["structure->xrd"]
    assert 0 < pair["recall@10_se"] < 0.5 and f"{pair['recall@10']:.3f} ± {pair['recall@10_se']:.3f}" in report
    assert metrics["run"]["command"].startswith("cmma evaluate -w ws --run sample")
    assert str(ws.root) not in report and "/tmp" not in report

    # the embeddings change: the kept section is marked stale
    manifest = ws.embeddings_dir(RUN) / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"stage"', '"touched": 1, "stage"', 1))
    run_evaluate(ws, EvaluateConfig(run=RUN, sections=["retrieval"]), force=True)
    report = (out / "report.md").read_text()
    assert "**Stale:**" in report and "cmma evaluate --sections latent" in report


def test_a_killed_evaluate_leaves_a_report_whose_figures_are_all_whole(ws, monkeypatch):
    import cmma_cli.evaluate.latent as latent
    import cmma_cli.evaluate.pipeline as pipeline

    out = ws.reports_dir(RUN)
    pipeline.run_evaluate(ws, EvaluateConfig(run=RUN, sections=["latent"], maps=["tsne"]), force=True)
    before = (out / "report.md").read_text()
    names = _pngs_whole(out / "report.md")

    def killed(coords, values, is_test, title, path):  # dies half-way through writing its figure
        Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(latent, "_plot", killed)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_evaluate(ws, EvaluateConfig(run=RUN, sections=["latent"], maps=["tsne"]), force=True)
    assert (out / "report.md").read_text() == before and _pngs_whole(out / "report.md") == names
    monkeypatch.undo()

    def dies(*args, **kwargs):  # killed after the new figures, before the report
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "write_json", dies)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_evaluate(ws, EvaluateConfig(run=RUN, sections=["latent"], maps=["tsne"]), force=True)
    assert (out / "report.md").read_text() == before and _pngs_whole(out / "report.md") == names
    assert not list(out.glob(".figures-*"))  # no staging folder left behind
