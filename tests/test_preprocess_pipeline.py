"""`run_preprocess` end to end on a raw workspace built from real data (MP-20 structures, text-mined recipes)."""

from __future__ import annotations

import json
import lzma
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pymatgen.core import Lattice, Structure

from cmma_cli.config import PreprocessConfig
from cmma_cli.errors import CMMAError
from cmma_cli.preprocess import run_preprocess
from cmma_cli.modalities.structure.graphs import build_graph
from cmma_cli.modalities.xrd.patterns import XRDGrid, computed_pattern, measured_pattern
from cmma_cli.sources.recipes import link_recipes
from cmma_cli.sources.schema import conform_descriptions, conform_materials, rejects_frame
from cmma_cli.sources.structures import material_record
from cmma_cli.workspace import Workspace, begin_stage, read_manifest, write_manifest, write_table

#: MP-20 materials that text-mined recipes link to (PbS twice: two polymorphs share its recipes).
LINKED = ["mp-2624", "mp-1057015", "mp-1012435", "mp-924129", "mp-6972", "mp-1227733"]


def write_raw(ws: Workspace, materials: pd.DataFrame, synthesis=None, descriptions=None) -> None:
    """A finished `fetch` stage holding these tables (what `cmma fetch` leaves behind)."""
    begin_stage(ws.raw)
    write_table(materials, ws.raw / "materials.parquet")
    if synthesis is not None:
        write_table(synthesis, ws.raw / "synthesis.parquet")
    write_table(
        conform_descriptions(descriptions if descriptions is not None else pd.DataFrame()),
        ws.raw / "descriptions.parquet",
    )
    write_table(rejects_frame([]), ws.raw / "rejects.parquet")
    write_manifest(ws.raw, "fetch", {"source": "test"}, rows={"materials": len(materials)})


def handmade_rows() -> list[dict]:
    isolated = Structure(Lattice.cubic(12.0), ["O", "O", "Xe"], [[0, 0, 0], [0.1, 0, 0], [0.5, 0.5, 0.5]])
    overlap = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.02, 0, 0]])
    rows = [material_record("test-isolated", isolated, "test"), material_record("test-overlap", overlap, "test")]
    broken = material_record("test-broken", overlap, "test")
    broken["structure"] = "{this is not a structure"
    return rows + [broken]


@pytest.fixture(scope="module")
def raw_dir(shared_data, tmp_path_factory) -> Path:
    """raw/ with 16 + 6 real MP-20 structures, 3 hand-made ones, real recipe links and two descriptions."""
    table = pd.read_csv(shared_data / "mp20" / "mp20_sample.csv")
    table = pd.concat([table.head(16), table[table["material_id"].isin(LINKED)]]).drop_duplicates("material_id")
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rec, sg in zip(table.itertuples(), table["spacegroup.number"]):
            structure = Structure.from_str(rec.cif, fmt="cif")
            rows.append(
                material_record(
                    rec.material_id, structure, "local:mp20", band_gap=rec.band_gap,
                    formation_energy_per_atom=rec.formation_energy_per_atom, spacegroup_number=int(sg),
                )
            )  # fmt: skip
    materials, _ = conform_materials(pd.DataFrame(rows + handmade_rows()))
    with lzma.open(shared_data / "synthesis" / "solid-state_dataset_2019-12-03.json.xz") as fh:
        recipes = json.load(fh)["reactions"]
    links, _, _ = link_recipes(recipes, materials)
    descriptions = pd.DataFrame(
        {
            "material_id": ["mp-2624", "mp-2624", "mp-6972"],
            "description": ["AlSb is Zincblende structured.  Al bonds to four equivalent Sb atoms at 2.66\u00a0Å.", "second", "YCuO2 is Delafossite\u2010like."],
            "source": ["robocrys"] * 3,
        }
    )  # fmt: skip
    ws = Workspace(tmp_path_factory.mktemp("raw-ws"))
    write_raw(ws, materials, links, descriptions)
    return ws.raw


@pytest.fixture(scope="module")
def user_files(tmp_path_factory) -> tuple[Path, Path]:
    """A folder of measured patterns and one of images, each with files that must be rejected."""
    root = tmp_path_factory.mktemp("user")
    xrd, images = root / "xrd", root / "images"
    xrd.mkdir()
    images.mkdir()
    silicon = Structure(Lattice.cubic(5.431), ["Si"] * 8, np.vstack([FCC, FCC + 0.25]))
    grid = XRDGrid(5.0, 100.0, 0.02)
    counts = 3000 * computed_pattern(silicon, grid) + 50
    text = "2theta counts\n" + "\n".join(f"{x:.3f} {y:.2f}" for x, y in zip(grid.points, counts))
    for name in ("mp-2624.xy", "test-overlap.xy", "mp-2624.txt", "no-such-id.xy"):
        (xrd / name).write_text(text)
    Image.fromarray((np.arange(64 * 64) % 255).reshape(64, 64).astype(np.uint8)).save(images / "mp-6972.png")
    (images / "mp-924129.png").write_bytes(b"not a png at all")
    return xrd, images


FCC = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])


def fresh_workspace(raw_dir: Path, tmp_path: Path) -> Workspace:
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(raw_dir, ws.raw)
    return ws


@pytest.fixture(scope="module")
def processed(raw_dir, user_files, tmp_path_factory):
    """One full run (one worker) with measured patterns and images: (workspace, manifest, table)."""
    ws = fresh_workspace(raw_dir, tmp_path_factory.mktemp("processed"))
    cfg = PreprocessConfig(workers=1, xrd_dir=str(user_files[0]), image_dir=str(user_files[1]), chunk_size=7)
    manifest = run_preprocess(ws, cfg)
    table = pq.read_table(ws.processed / "materials.parquet").to_pandas().set_index("material_id", drop=False)
    return ws, manifest, table


def test_processed_schema_is_the_contract(processed):
    ws, manifest, table = processed
    schema = pq.read_schema(ws.processed / "materials.parquet")
    types = {name: str(schema.field(name).type) for name in schema.names}
    assert types["atomic_numbers"] == "list<element: int16>"
    assert types["edge_src"] == types["edge_dst"] == "list<element: int32>"
    assert types["edge_dist"] == types["edge_vec"] == types["xrd"] == "list<element: float>"
    assert types["synthesis_texts"] == types["recipe_ids"] == "list<element: string>"
    for name in ("material_id", "formula", "elements", "nsites", "source", "band_gap", "formation_energy_per_atom",
                 "description", "xrd_source", "image_path"):  # fmt: skip
        assert name in types
    assert "structure" not in types
    assert len(table) == manifest["rows"]["materials"] == 25
    assert set(manifest["properties"]) >= {"band_gap", "formation_energy_per_atom", "spacegroup_number", "density"}
    assert manifest["xrd_grid"]["size"] == 1601 and manifest["inputs"]["fetch"]


def test_graph_columns_match_a_direct_build(processed, raw_dir):
    _, _, table = processed
    raw = pd.read_parquet(raw_dir / "materials.parquet").set_index("material_id")
    for mid in ("mp-924129", "mp-1227733"):
        graph = build_graph(Structure.from_dict(json.loads(raw.loc[mid, "structure"])), cutoff=5.0)
        row = table.loc[mid]
        assert row["atomic_numbers"].tolist() == graph.atomic_numbers.tolist()
        assert len(row["atomic_numbers"]) == row["nsites"]
        np.testing.assert_array_equal(row["edge_src"], graph.edge_src)
        np.testing.assert_array_equal(row["edge_dst"], graph.edge_dst)
        np.testing.assert_allclose(row["edge_dist"], graph.edge_dist)
        np.testing.assert_allclose(row["edge_vec"], graph.edge_vec)
        assert len(row["edge_vec"]) == 3 * len(row["edge_src"])


def test_bad_structures_are_rejected_with_reasons_and_isolated_atoms_kept(processed):
    ws, manifest, table = processed
    rejects = pd.read_parquet(ws.processed / "rejects.parquet")
    by_item = dict(zip(rejects["item"], rejects["reason"]))
    assert by_item["test-overlap"].startswith("overlapping atoms")
    assert by_item["test-broken"].startswith("unreadable structure")
    for mid in ("test-overlap", "test-broken"):
        assert table.loc[mid, "atomic_numbers"] is None and table.loc[mid, "edge_src"] is None
    isolated = table.loc["test-isolated"]
    assert isolated["atomic_numbers"].tolist() == [8, 8, 54] and len(isolated["edge_src"]) == 2
    assert manifest["graphs"]["materials_with_isolated_atoms"] == 1
    assert manifest["modalities"]["structure"] == 23
    assert manifest["rejects"]["structure"] == 2


def test_recipes_become_one_text_each_shared_by_polymorphs(processed):
    _, manifest, table = processed
    linked = table[table["recipe_ids"].notna()]
    assert set(LINKED) <= set(linked.index)
    for _, row in linked.iterrows():
        assert len(row["synthesis_texts"]) == len(row["recipe_ids"]) == len(set(row["recipe_ids"])) >= 1
    pbs = [table.loc[m] for m in ("mp-1057015", "mp-1012435")]
    assert pbs[0]["recipe_ids"].tolist() == pbs[1]["recipe_ids"].tolist() and len(pbs[0]["recipe_ids"]) == 4
    assert all(text.startswith("Synthesis of PbS.") for text in pbs[0]["synthesis_texts"])
    assert all("Procedure:" in text for text in pbs[0]["synthesis_texts"])
    assert manifest["modalities"]["synthesis"] == len(linked)


def test_descriptions_are_normalised_and_one_per_material(processed):
    _, manifest, table = processed
    assert (
        table.loc["mp-2624", "description"]
        == "AlSb is Zincblende structured. Al bonds to four equivalent Sb atoms at 2.66 Å."
    )
    assert table.loc["mp-6972", "description"] == "YCuO2 is Delafossite-like."
    assert manifest["modalities"]["description"] == 2 and table["description"].notna().sum() == 2


def test_xrd_is_computed_or_measured_on_one_grid(processed, user_files):
    ws, manifest, table = processed
    grid = XRDGrid()
    present = table[table["xrd"].notna()]
    assert all(len(x) == grid.size for x in present["xrd"])
    assert table.loc["mp-924129", "xrd_source"] == "computed"
    assert table.loc["mp-2624", "xrd_source"] == "measured"  # a measured pattern wins over a computed one
    np.testing.assert_allclose(table.loc["mp-2624", "xrd"], measured_pattern(user_files[0] / "mp-2624.xy", grid))
    # a broken structure keeps its measured pattern
    assert table.loc["test-overlap", "xrd_source"] == "measured"
    assert table.loc["test-broken", "xrd"] is None and pd.isna(table.loc["test-broken", "xrd_source"])
    assert manifest["modalities"]["xrd"] == 24 and manifest["modalities"]["xrd_measured"] == 2
    reasons = pd.read_parquet(ws.processed / "rejects.parquet").query("source == 'measured_xrd'")["reason"].tolist()
    assert sorted(reasons) == [
        "a second file for mp-2624 (kept mp-2624.txt)",
        "no material with id 'no-such-id' in raw/materials.parquet",
    ]


def test_images_are_linked_by_id_and_broken_ones_rejected(processed, user_files):
    ws, manifest, table = processed
    assert table.loc["mp-6972", "image_path"] == str((user_files[1] / "mp-6972.png").resolve())
    assert pd.isna(table.loc["mp-924129", "image_path"])
    rejects = pd.read_parquet(ws.processed / "rejects.parquet").query("source == 'image'")
    assert rejects["reason"].str.startswith("not a readable image").tolist() == [True]
    assert manifest["modalities"]["image"] == 1


def test_splits_cover_every_material_and_never_share_a_formula(processed):
    ws, manifest, table = processed
    splits = pd.read_parquet(ws.processed / "splits.parquet")
    assert sorted(splits["material_id"]) == sorted(table.index)
    assert set(splits["split"]) <= {"train", "val", "test"}
    merged = splits.merge(table[["formula"]], left_on="material_id", right_index=True)
    assert merged.groupby("formula")["split"].nunique().max() == 1
    assert sum(manifest["splits"].values()) == len(table)


def test_rerun_skips_and_force_redoes(raw_dir, tmp_path, capsys):
    ws = fresh_workspace(raw_dir, tmp_path)
    cfg = PreprocessConfig(workers=1, xrd=False)
    first = run_preprocess(ws, cfg)
    stamp = (ws.processed / "materials.parquet").stat().st_mtime_ns
    capsys.readouterr()
    again = run_preprocess(ws, PreprocessConfig(workers=1, xrd=False, chunk_size=3))  # chunking changes nothing
    assert "up to date" in capsys.readouterr().err
    assert again == first and (ws.processed / "materials.parquet").stat().st_mtime_ns == stamp
    forced = run_preprocess(ws, cfg, force=True)
    assert (ws.processed / "materials.parquet").stat().st_mtime_ns != stamp
    assert forced["config_hash"] == first["config_hash"]
    wider = run_preprocess(ws, PreprocessConfig(workers=1, xrd=False, cutoff=6.0))  # a new config redoes
    assert wider["graphs"]["edges"] > first["graphs"]["edges"]
    assert read_manifest(ws.processed)["config"]["structure"]["cutoff"] == 6.0


def test_changed_measured_folder_reruns(raw_dir, tmp_path, user_files):
    ws = fresh_workspace(raw_dir, tmp_path)
    folder = tmp_path / "xrd"
    folder.mkdir()
    shutil.copy(user_files[0] / "mp-2624.xy", folder)
    cfg = PreprocessConfig(workers=1, xrd=False, xrd_dir=str(folder))
    assert run_preprocess(ws, cfg)["modalities"]["xrd_measured"] == 1
    shutil.copy(user_files[0] / "mp-2624.xy", folder / "mp-6972.xy")
    assert run_preprocess(ws, cfg)["modalities"]["xrd_measured"] == 2


def test_site_cap_rejects_large_structures(raw_dir, tmp_path):
    ws = fresh_workspace(raw_dir, tmp_path)
    manifest = run_preprocess(ws, PreprocessConfig(workers=1, xrd=False, max_sites=4))
    rejects = pd.read_parquet(ws.processed / "rejects.parquet")
    capped = rejects[rejects["reason"].str.contains("more than the cap of 4")]
    table = pd.read_parquet(ws.processed / "materials.parquet").set_index("material_id")
    assert len(capped) > 5 and (table.loc[capped["item"], "nsites"] > 4).all()
    assert manifest["modalities"]["structure"] == (table["nsites"] <= 4).sum() - 2  # less the broken two


def test_worker_processes_give_the_same_table(raw_dir, processed, user_files, tmp_path):
    ws = fresh_workspace(raw_dir, tmp_path)
    cfg = PreprocessConfig(workers=2, xrd_dir=str(user_files[0]), image_dir=str(user_files[1]), chunk_size=5)
    manifest = run_preprocess(ws, cfg)
    assert manifest["run"]["workers"] == 2 and manifest["config_hash"] == processed[1]["config_hash"]
    pooled = pq.read_table(ws.processed / "materials.parquet")
    assert pooled.equals(pq.read_table(processed[0].processed / "materials.parquet"))


def test_missing_or_empty_raw_data_says_to_run_fetch(tmp_path, raw_dir):
    with pytest.raises(CMMAError, match="run `cmma fetch` first"):
        run_preprocess(Workspace(tmp_path / "nothing"), PreprocessConfig(workers=1))
    ws = Workspace(tmp_path / "empty")
    empty = pd.read_parquet(raw_dir / "materials.parquet").head(0)
    write_raw(ws, empty)
    with pytest.raises(CMMAError, match=r"holds no materials: run `cmma fetch`"):
        run_preprocess(ws, PreprocessConfig(workers=1))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"cutoff": 0}, "--cutoff"),
        ({"min_distance": 6.0}, "--min-distance"),
        ({"max_neighbors": 0}, "--max-neighbors"),
        ({"wavelength": "CuKz"}, "--wavelength 'CuKz' is not known"),
        ({"split_by": "spacegroup"}, "--split-by"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "sum to less than 1"),
        ({"two_theta_min": 80, "two_theta_max": 20}, "XRD grid"),
        ({"xrd_dir": "/no/such/folder"}, "does not exist"),
        ({"chunk_size": 0}, "--chunk-size"),
    ],
)
def test_bad_options_get_one_sentence(raw_dir, tmp_path, options, message):
    ws = fresh_workspace(raw_dir, tmp_path)
    with pytest.raises(CMMAError, match=message):
        run_preprocess(ws, PreprocessConfig(workers=1, **options))


def test_default_workers_use_all_cores_but_not_for_a_handful_of_materials(monkeypatch):
    from cmma_cli.preprocess import pipeline

    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 16)
    assert pipeline.default_workers(25) == 1
    assert pipeline.default_workers(1130) == 5
    assert pipeline.default_workers(155_000) == 16
    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: None)
    assert pipeline.default_workers(155_000) == 1
