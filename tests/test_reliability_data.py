"""Fault-injection findings on the data side: each test is one finding, and failed before its fix.

Absurd cells (a 1000 A cell, a ten-thousand-site supercell) are rejected before any work; user data is never read
as rich markup; endpoint credentials never reach the manifest; one-composition data sets still get val and test;
multi-phase and self-contradicting CIFs are refused; a partial measured pattern gets a warning; the probes show
a median dummy; a baselines-only report refers to no absent table; and bad inputs get one sentence, exit 2.
"""

from __future__ import annotations

import json
import lzma
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pymatgen.core import Lattice, Structure

from cmma_cli.config import EvaluateConfig, PreprocessConfig
from cmma_cli.errors import CMMAError
from cmma_cli.workspace import Workspace, read_manifest, reseal

ROOT = Path(__file__).resolve().parents[1]


def _nacl(a: float = 5.64) -> Structure:
    return Structure(Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def _fcc_al(n: int) -> Structure:
    base = Structure(Lattice.cubic(4.05), ["Al"] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    return base * (n, n, n)


NACL_CIF = textwrap.dedent("""\
    data_NaCl
    _symmetry_space_group_name_H-M   'P 1'
    _cell_length_a   5.64
    _cell_length_b   5.64
    _cell_length_c   5.64
    _cell_angle_alpha   90
    _cell_angle_beta   90
    _cell_angle_gamma   90
    _chemical_formula_sum   'Na1 Cl1'
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


# ------------------------------------------------------------------------------- 1. size guards

#: Address-space cap of the subprocesses that meet an absurd cell: with the guards missing they die (MemoryError)
#: in seconds instead of taking the machine's memory.
MEMORY_CAP = 3 * 1024**3

GUARD_SCRIPT = """
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (MEMCAP, MEMCAP))
from pymatgen.core import Structure
from cmma_cli.config import PreprocessConfig
from cmma_cli.modalities import REGISTRY
from cmma_cli.preprocess.featurize import featurize
out = {}
for name, (text, options) in json.loads(sys.stdin.read()).items():
    t = time.perf_counter()
    got = featurize(name, text, {}, PreprocessConfig(workers=1, **options), list(REGISTRY.values()))
    out[name] = {"rejects": [r[2] for r in got.rejects], "columns": sorted(k for k, v in got.values.items() if v is not None),
                 "seconds": time.perf_counter() - t}
print(json.dumps(out))
"""


def test_absurd_cells_are_rejected_before_any_work_under_a_memory_cap():
    """A 2-atom a=1000 A cell grew preprocess to 13 GB; a 10,976-site supercell sat in XRD for minutes. With the
    default caps both are rejects with their reason, in well under a second each, under a 3 GiB address-space cap."""
    structures = {"huge_cell": (_nacl(1000.0).to_json(), {}), "supercell": (_fcc_al(14).to_json(), {}),
                  "normal": (_nacl().to_json(), {}),
                  # a 30 A cell is below the volume cap, but with Mo K-alpha its pattern needs ~900,000 reflections
                  "roomy_cell": (_nacl(30.0).to_json(), {"wavelength": "MoKa"})}
    proc = subprocess.run([sys.executable, "-c", GUARD_SCRIPT.replace("MEMCAP", str(MEMORY_CAP))],
                          input=json.dumps(structures), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert any("cell volume 1,000,000,000 A^3, more than the cap" in r for r in got["huge_cell"]["rejects"])
    assert any("10976 sites, more than the cap of 1000" in r and "--max-sites" in r for r in got["supercell"]["rejects"])
    assert any("reflections" in r and "--max-reflections" in r for r in got["roomy_cell"]["rejects"])
    for name in ("huge_cell", "supercell", "roomy_cell"):
        assert not {"atomic_numbers", "xrd"} & set(got[name]["columns"]) and got[name]["seconds"] < 5
    assert not got["normal"]["rejects"] and {"atomic_numbers", "xrd"} <= set(got["normal"]["columns"])


def test_the_caps_are_preprocess_options_and_a_raised_cap_keeps_the_structure():
    from cmma_cli.modalities import REGISTRY
    from cmma_cli.preprocess.featurize import featurize

    cfg = PreprocessConfig(workers=1, xrd=False, max_volume=2e9)  # no pattern: only the volume cap applies
    got = featurize("huge", _nacl(1000.0).to_json(), {}, cfg, list(REGISTRY.values()))
    assert not got.rejects and got.values.get("atomic_numbers") is not None
    with pytest.raises(CMMAError, match="--max-volume must be a positive volume"):
        from cmma_cli.preprocess.pipeline import validate

        validate(PreprocessConfig(max_volume=0))


def _capped_memory():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def test_a_run_with_absurd_cells_goes_on_and_lists_them_as_rejects(tmp_path, cli):
    folder = tmp_path / "cifs"
    folder.mkdir()
    for name, s in {"huge": _nacl(1000.0), "big": _fcc_al(7), "ok": _nacl()}.items():
        (folder / f"{name}.cif").write_text(s.to(fmt="cif"))
    ws = tmp_path / "ws"
    assert cli("fetch", "-w", ws, folder).exit_code == 0
    proc = subprocess.run([sys.executable, "-m", "cmma_cli", "preprocess", "-w", str(ws), "--workers", "1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, preexec_fn=_capped_memory)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rejects = pd.read_parquet(ws / "processed" / "rejects.parquet").set_index("item")
    assert "more than the cap" in rejects.loc["huge", "reason"] and "1372 sites" in rejects.loc["big", "reason"]
    table = pd.read_parquet(ws / "processed" / "materials.parquet").set_index("material_id")
    assert table.loc["ok", "xrd"] is not None and table.loc["huge", "xrd"] is None


# ------------------------------------------------------------------------------------ 11. markup


def test_user_strings_are_printed_verbatim_not_as_rich_markup(monkeypatch, capsys):
    from cmma_cli import retrieve as R
    from cmma_cli.config import RetrieveConfig

    evil = "[bold red]x[/]"
    result = R.Result("run[/]", {"kind": "text", "value": "q"}, "text", "structure", 1, [], 3,
                      [{"rank": 1, "score": 0.9, "material_id": evil, "formula": "[i]NaCl[/i]", "crystal_system": "cubic"}],
                      {"load": 1.0, "encode": 1.0, "search": 1.0})
    monkeypatch.setattr(R, "search", lambda ws, query, cfg: result)
    R.run_retrieve(Workspace(Path("/nonexistent")), R.Query(text="q"), RetrieveConfig())
    out = capsys.readouterr().out
    assert evil in out and "[i]NaCl[/i]" in out


def test_a_markup_like_workspace_name_is_shown_as_given(tmp_path, cli, monkeypatch):
    folder = tmp_path / "cifs"
    folder.mkdir()
    (folder / "ok.cif").write_text(NACL_CIF)
    monkeypatch.chdir(tmp_path)
    result = cli("fetch", "-w", "[red]w", folder)
    assert result.exit_code == 0 and "[red]w" in result.output


# ---------------------------------------------------------------------------------- 13. endpoint


def test_public_url_strips_userinfo_and_secret_parameters():
    from cmma_cli.sources.materials_project import public_url

    assert public_url("https://user:pw@host.example:8443/api/?api_key=SECRET&x=1") == "https://host.example:8443/api/?x=1"
    assert public_url("http://127.0.0.1:5000/") == "http://127.0.0.1:5000/"
    assert public_url(None) is None


def test_endpoint_credentials_never_reach_the_manifest(cli, mp_server, tmp_path):
    from mp_server import TEST_API_KEY

    endpoint = mp_server.url.replace("http://", "http://alice:hunter2@")
    ws = tmp_path / "ws"
    result = cli("fetch", "--source", "mp", "--api-key", TEST_API_KEY, "--endpoint", endpoint, "--elements", "O",
                 "--max-sites", "6", "--no-synthesis", "--no-descriptions", "-w", ws)
    assert result.exit_code == 0, result.output
    manifest_text = (ws / "raw" / "manifest.json").read_text()
    assert "hunter2" not in manifest_text and "alice" not in manifest_text and "hunter2" not in result.output
    assert json.loads(manifest_text)["config"]["endpoint"] == mp_server.url


# -------------------------------------------------------------------------------- 14. real data


def test_one_composition_falls_back_to_a_per_material_split():
    from cmma_cli.preprocess.splits import assign_splits

    carbon = pd.DataFrame({"material_id": [f"c-{i}" for i in range(200)], "formula": ["C"] * 200})
    splits = assign_splits(carbon, 0.1, 0.1, seed=0)
    counts = splits["split"].value_counts()
    assert splits.attrs["fallback"] and counts["val"] > 10 and counts["test"] > 10
    assert set(splits["group"]) == {"C"}
    mixed = pd.DataFrame({"material_id": [f"m-{i}" for i in range(200)], "formula": [f"Li{i}O" for i in range(200)]})
    assert not assign_splits(mixed, 0.1, 0.1).attrs["fallback"]  # enough groups: grouped as before


def test_preprocess_says_when_it_split_per_material(tmp_path, cli):
    folder = tmp_path / "carbon"
    folder.mkdir()
    for i in range(30):
        diamond = Structure(Lattice.cubic(3.57 + 0.01 * i), ["C"] * 2, [[0, 0, 0], [0.25, 0.25, 0.25]])
        (folder / f"c{i}.cif").write_text(diamond.to(fmt="cif"))
    ws = tmp_path / "ws"
    assert cli("fetch", "-w", ws, folder).exit_code == 0
    result = cli("preprocess", "-w", ws, "--workers", "1", "--no-xrd")
    assert result.exit_code == 0, result.output
    assert "Split per material" in result.output and "only 1 distinct composition" in result.output
    manifest = read_manifest(ws / "processed")
    assert manifest["splits"]["val"] > 0 and manifest["splits"]["test"] > 0 and manifest["split_by"] == "material"


def test_multi_phase_and_self_contradicting_cifs_are_rejected_with_the_reason(tmp_path, cli):
    folder = tmp_path / "cifs"
    folder.mkdir()
    (folder / "ok.cif").write_text(NACL_CIF)
    (folder / "two_phases.cif").write_text(NACL_CIF + "\n" + NACL_CIF.replace("data_NaCl", "data_phase2"))
    (folder / "wrong_formula.cif").write_text(NACL_CIF.replace("'Na1 Cl1'", "'Na2 Cl1'"))
    ws = tmp_path / "ws"
    result = cli("fetch", "-w", ws, folder)
    assert result.exit_code == 0, result.output
    rejects = pd.read_parquet(ws / "raw" / "rejects.parquet").set_index("item")["reason"]
    assert "2 structures" in rejects["two_phases"] and "one file per phase" in rejects["two_phases"]
    assert "disagree with the CIF's stated formula" in rejects["wrong_formula"]
    assert list(pd.read_parquet(ws / "raw" / "materials.parquet")["material_id"]) == ["ok"]


def test_pattern_coverage_is_measured_on_the_grid(tmp_path):
    from cmma_cli.retrieve import pattern_coverage

    path = tmp_path / "narrow.xy"
    x = np.arange(10.0, 19.0001, 0.01)
    path.write_text("\n".join(f"{a:.2f} {np.exp(-(a - 15) ** 2):.4f}" for a in x))
    share, first, last = pattern_coverage(path, {"two_theta_min": 10.0, "two_theta_max": 90.0})
    assert share == pytest.approx(9 / 80, abs=1e-3) and first == pytest.approx(10.0) and last == pytest.approx(19.0)


def test_median_dummy_is_reported_for_zero_inflated_targets():
    from cmma_cli.evaluate.probes import Part, fit_regression
    from cmma_cli.evaluate.report import target_rows

    rng = np.random.default_rng(0)
    y = np.where(rng.random(300) < 0.95, 0.0, rng.uniform(1, 5, 300))
    X = rng.normal(size=(300, 4))
    parts = {s: Part(np.array([f"{s}{i}" for i in range(n)]), X[a:a + n], y[a:a + n])
             for s, a, n in (("train", 0, 200), ("val", 200, 50), ("test", 250, 50))}
    scores, _ = fit_regression(parts)
    assert scores["dummy_median"]["mae"] < scores["dummy"]["mae"]
    rows = target_rows({"probes": {"regression": {"band_gap": {"unified": scores}}}}, "regression", "band_gap")
    assert [r[0] for r in rows[:2]] == ["dummy (train mean)", "dummy (train median)"]


def test_a_baselines_only_report_refers_to_no_absent_table():
    from cmma_cli.evaluate.report import render_markdown

    scores = {"mae": 0.5, "rmse": 0.7, "r2": 0.1, "n": 20, "inputs": "structure"}
    metrics = {"run": {"run": "r", "ks": [1], "modalities": ["structure"], "command": "cmma evaluate",
                       "splits": {s: {"materials": 10, "structure": 10} for s in ("train", "val", "test")}},
               "baselines": {"regression": {"density": {"structure": scores}}, "classification": {}, "skipped": [],
                             "description": "Supervised models trained directly. They appear in the property and "
                                            "classification tables above, below the CMMA probes."}}
    text = render_markdown(metrics)
    assert "above" not in text and "### density" in text and "supervised structure" in text


# ---------------------------------------------------------------------------- 10. one sentence


def test_infinite_property_values_become_missing_and_are_counted(tmp_path, cli):
    table = pd.DataFrame({"material_id": ["a", "b", "c"], "cif": [_nacl(5.6 + 0.1 * i).to(fmt="cif") for i in range(3)],
                          "band_gap": ["inf", "1.5", "-inf"], "heat": [1.0, float("inf"), 2.0]})
    path = tmp_path / "t.csv"
    table.to_csv(path, index=False)
    ws = tmp_path / "ws"
    result = cli("fetch", "-w", ws, path)
    assert result.exit_code == 0, result.output
    raw = pd.read_parquet(ws / "raw" / "materials.parquet").set_index("material_id")
    assert raw["band_gap"].isna().tolist() == [True, False, True] and raw["heat"].isna().tolist() == [False, True, False]
    assert read_manifest(ws / "raw")["non_finite_values"] == {"band_gap": 2, "heat": 1}
    assert "Infinite property values were stored as missing" in result.output


def test_preprocess_clears_infinities_a_raw_table_still_holds(tmp_path):
    import pyarrow as pa

    from cmma_cli.preprocess.stream import clear_non_finite

    counts: dict[str, int] = {}
    table = pa.table({"x": pa.array([1.0, float("inf"), None, -float("inf")]), "s": ["a", "b", "c", "d"]})
    cleaned = clear_non_finite(table, counts)
    assert cleaned.column("x").to_pylist() == [1.0, None, None, None] and counts == {"x": 2}


def test_a_corrupt_xz_recipe_file_is_one_sentence(tmp_path, cli):
    folder = tmp_path / "cifs"
    folder.mkdir()
    (folder / "ok.cif").write_text(NACL_CIF)
    bad = tmp_path / "recipes.json.xz"
    bad.write_bytes(b"this is not xz at all")
    result = cli("fetch", "-w", tmp_path / "ws", folder, bad)
    assert result.exit_code == 2 and "Could not read recipes from" in result.output and "Traceback" not in result.output
    half = tmp_path / "half.json.xz"
    half.write_bytes(lzma.compress(b'[{"doi": "x"}' * 100)[:40])  # cut short
    result = cli("fetch", "-w", tmp_path / "ws", folder, half)
    assert result.exit_code == 2 and "Could not read recipes from" in result.output


def test_wrong_toml_types_are_one_sentence(tmp_path, cli):
    config = tmp_path / "c.toml"
    config.write_text('[preprocess]\nmax_sites = "many"\n')
    result = cli("preprocess", "-w", tmp_path / "ws", "--config", config)
    assert result.exit_code == 2 and "must be a whole number" in result.output


# --------------------------------------------------------- the embedded sample: evaluate and retrieve


@pytest.fixture(scope="module")
def sample_copy(embedded_sample, tmp_path_factory):
    return embedded_sample.copy(tmp_path_factory.mktemp("reliability") / "ws")


def test_retrieve_warns_when_a_measured_pattern_covers_little_of_the_grid(sample_copy, tmp_path, cli):
    path = tmp_path / "narrow.xy"
    x = np.arange(10.0, 19.0001, 0.02)
    path.write_text("\n".join(f"{a:.2f} {np.exp(-((a - 14.3) / 0.1) ** 2) + 0.01:.4f}" for a in x))
    result = cli("retrieve", "-w", sample_copy.root, "--pattern", path, "-k", "3")
    assert result.exit_code == 0, result.output
    assert "covers 2-theta 10.0-19.0 degrees, 11% of the 10-90 degree grid" in " ".join(result.output.split())


def test_a_structure_query_from_an_encoder_it_cannot_use_is_one_sentence(sample_copy, tmp_path, cli):
    cif = tmp_path / "q.cif"
    cif.write_text(NACL_CIF)
    result = cli("retrieve", "-w", sample_copy.root, "--structure", cif, "--from", "text")
    assert result.exit_code == 2 and "encoded as structure, xrd or composition, not text" in result.output
    result = cli("retrieve", "-w", sample_copy.root, "--structure", cif, "--from", "xrd", "-k", "2")
    assert result.exit_code == 0, result.output


def test_an_empty_test_split_is_one_sentence(embedded_sample, tmp_path):
    ws = embedded_sample.copy(tmp_path / "ws")
    splits = pd.read_parquet(ws.processed / "splits.parquet")
    splits["split"] = splits["split"].replace({"test": "train"})
    splits.to_parquet(ws.processed / "splits.parquet")
    reseal(ws.processed)  # a deliberate edit (a swapped stage file is refused otherwise)
    with pytest.raises(CMMAError, match=r"The test split in .* is empty \(0 of \d+ materials\).*--test-fraction"):
        from cmma_cli.evaluate.pipeline import run_evaluate

        run_evaluate(ws, EvaluateConfig(run="sample", sections=["retrieval"]))


def test_garbage_or_foreign_parquet_is_one_sentence_naming_the_file(embedded_sample, tmp_path):
    from cmma_cli.evaluate.pipeline import run_evaluate
    from cmma_cli.retrieve import Query, Retriever

    ws = embedded_sample.copy(tmp_path / "ws")
    unified = ws.embeddings_dir("sample") / "unified.parquet"
    unified.write_bytes(b"PAR1 not really")
    reseal(ws.embeddings_dir("sample"))  # as from a cmma that recorded no file digests: the reader's own sentence
    with pytest.raises(CMMAError, match=r"unified.parquet is not a readable Parquet file .*cmma embed --run sample --force"):
        run_evaluate(ws, EvaluateConfig(run="sample", sections=["retrieval"]))
    with pytest.raises(CMMAError, match=r"unified.parquet .*cmma embed --run sample --force"):
        Retriever(ws, "sample").query(Query(material="x"), target="unified")
    pd.DataFrame({"foo": [1, 2]}).to_parquet(ws.processed / "splits.parquet")
    reseal(ws.processed)
    with pytest.raises(CMMAError, match=r"splits.parquet lacks the columns material_id, split, group .*cmma preprocess --force"):
        run_evaluate(ws, EvaluateConfig(run="sample", sections=["retrieval"]))
