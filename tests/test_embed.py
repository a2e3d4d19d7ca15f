"""``cmma embed`` on the built-in sample after a short training: the contract tables, indexes, manifest, skips,
new inputs embedded without retraining, and every error sentence."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cmma_cli.config import EmbedConfig
from cmma_cli.embed import resolve_checkpoint, run_embed
from cmma_cli.embeddings import read_vectors, tables
from cmma_cli.modalities import REGISTRY
from cmma_cli.embed_inputs import embed_inputs
from cmma_cli.errors import CMMAError
from cmma_cli.index import brute_force, load_index
from cmma_cli.modalities.base import Context
from cmma_cli.modalities.batches import MaterialSet
from cmma_cli.model import load_model
from cmma_cli.workspace import Workspace, manifest_hash, read_manifest


def cif_of(ws: Workspace, material_id: str) -> str:
    """The CIF of a raw material (its stored structure written by pymatgen)."""
    from pymatgen.core import Structure
    from pymatgen.io.cif import CifWriter

    raw = pq.read_table(ws.raw / "materials.parquet", columns=["material_id", "structure"]).to_pandas()
    text = raw.loc[raw["material_id"] == material_id, "structure"].iloc[0]
    return str(CifWriter(Structure.from_dict(json.loads(text))))


def copy_ws(ws: Workspace, tmp_path: Path) -> Workspace:
    """A private copy of the shared workspace, for tests that write."""
    return Workspace(Path(shutil.copytree(ws.root, tmp_path / "ws")))


def stored(ws: Workspace, run: str, name: str) -> tuple[list[str], np.ndarray]:
    table, vectors = read_vectors(ws.embeddings_dir(run) / f"{name}.parquet", ["material_id"])
    return [str(m) for m in table.column("material_id").to_pylist()], vectors


# --------------------------------------------------------------------------------------------- the tables


def test_every_modality_table_holds_one_unit_vector_per_material_that_has_it(embedded_sample):
    ws, run, d = embedded_sample.ws, embedded_sample.run, embedded_sample.dim
    out = ws.embeddings_dir(run)
    counts = read_manifest(ws.processed)["modalities"]
    processed = pq.read_table(ws.processed / "materials.parquet", columns=["material_id", "description"]).to_pandas()
    expected = {"structure": counts["structure"], "xrd": counts["xrd"], "text": int(processed["description"].notna().sum())}
    for name, rows in expected.items():
        schema = pq.read_schema(out / f"{name}.parquet")
        assert schema.field("material_id").type == pa.string()
        assert pa.types.is_list(schema.field("embedding").type) and schema.field("embedding").type.value_type == pa.float32()
        ids, vectors = stored(ws, run, name)
        assert len(ids) == rows == len(set(ids)) and vectors.shape == (rows, d)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    text = pq.read_table(out / "text.parquet").to_pandas()
    assert set(text["text_source"]) == {"description"}  # the sample has descriptions, no recipes
    assert pq.read_table(out / "synthesis.parquet").num_rows == 0
    assert embedded_sample.embed["counts"] == {"structure": expected["structure"], "text": expected["text"],
                                               "xrd": expected["xrd"], "synthesis": 0, "unified": len(processed)}


def test_unified_is_the_normalised_mean_of_the_modalities_a_material_has(embedded_sample):
    ws, run = embedded_sample.ws, embedded_sample.run
    unified = pq.read_table(ws.embeddings_dir(run) / "unified.parquet").to_pandas()
    parts = {m: dict(zip(*stored(ws, run, m))) for m in ("structure", "text", "xrd")}
    assert len(unified) == len(parts["structure"])  # every sample material has a structure (and all three here)
    for row in unified.sample(20, random_state=0).itertuples():
        assert list(row.modalities) == [m for m in ("structure", "text", "xrd") if row.material_id in parts[m]]  # the run's order
        mean = np.mean([parts[m][row.material_id] for m in row.modalities], axis=0)
        np.testing.assert_allclose(np.asarray(row.embedding), mean / np.linalg.norm(mean), atol=1e-5)


def test_stored_embeddings_are_what_the_checkpoint_computes(embedded_sample):
    ws, run = embedded_sample.ws, embedded_sample.run
    model, ckpt = load_model(ws.run_dir(run) / "best.pt")
    table = pq.read_table(ws.processed / "materials.parquet").slice(0, 12)
    materials = MaterialSet(table, {m: ckpt["spec"]["encoders"][m] for m in ("structure", "xrd")},
                            Context(read_manifest(ws.processed), cache_dir=ws.cache))
    batch = materials.collate(np.arange(12))
    for modality in ("structure", "xrd"):
        with torch.no_grad():
            expected = model.embed(modality, batch["inputs"][modality]).numpy()
        ids, vectors = stored(ws, run, modality)
        rows = [ids.index(m) for m in np.array(materials.material_ids)[batch["masks"][modality].numpy()]]
        np.testing.assert_allclose(vectors[rows], expected, atol=1e-5)


def test_each_index_row_is_the_parquet_row_and_the_manifest_ties_run_checkpoint_and_data(embedded_sample):
    ws, run = embedded_sample.ws, embedded_sample.run
    out = ws.embeddings_dir(run)
    for name in ("structure", "text", "xrd", "unified"):
        _, vectors = stored(ws, run, name)
        index = load_index(out / f"{name}.faiss")
        assert index.ntotal == len(vectors) and type(index).__name__ == "IndexFlatIP"
        np.testing.assert_array_equal(index.reconstruct_n(0, index.ntotal), vectors)
    manifest = read_manifest(out)
    best = torch.load(ws.run_dir(run) / "best.pt", weights_only=True)
    assert manifest["stage"] == "embed" and manifest["run"] == run and manifest["dim"] == embedded_sample.dim
    assert ws.locate(manifest["checkpoint"]["path"]) == ws.run_dir(run) / "best.pt"
    assert manifest["checkpoint"]["epoch"] == best["epoch"]
    assert manifest["inputs"] == {"preprocess": manifest_hash(ws.processed), "train": manifest_hash(ws.run_dir(run))}
    assert manifest["modalities"] == ["structure", "text", "xrd"]
    assert set(manifest["indexes"]) == {"structure", "text", "xrd", "synthesis", "unified"}


def test_text_is_the_description_else_the_mean_of_the_recipes_and_every_recipe_link_gets_a_row(embedded_sample):
    from cmma_cli.encode import Encoder
    from cmma_cli.modalities import get_modality
    from cmma_cli.modalities.text.encoder import embed_texts

    ws, run = embedded_sample.ws, embedded_sample.run
    encoder = Encoder(ws.run_dir(run) / "best.pt", read_manifest(ws.processed), cache_dir=ws.cache)
    r1 = "Solid-state synthesis of LiCoO2. Precursors: Li2CO3, Co3O4. Procedure: ground; heated at 900 °C for 12 h."
    r2 = "Sol-gel synthesis of LiCoO2. Precursors: LiNO3, Co(NO3)2. Procedure: dried at 120 °C; calcined at 700 °C."
    r3 = "Solid-state synthesis of NaCl. Precursors: Na2CO3, NH4Cl. Procedure: heated at 500 °C for 2 h."
    table = pa.table({
        "material_id": ["a", "b", "c"],
        "description": ["LiCoO2 crystallizes in the trigonal R-3m space group.", None, None],
        "synthesis_texts": [[r3], [r1, r2], None],
        "recipe_ids": [["rcp-3"], ["rcp-1", "rcp-2"], None],
    })
    tables = get_modality("text").embed_processed(encoder, table)  # the text modality's embed tables
    (text_cols, text_vectors), (synth_cols, synth_vectors) = tables["text"], tables["synthesis"]
    one = dict(zip([table["description"][0].as_py(), r1, r2, r3], embed_texts(
        encoder, [table["description"][0].as_py(), r1, r2, r3])))
    assert text_cols["material_id"].to_pylist() == ["a", "b"]
    assert text_cols["text_source"].to_pylist() == ["description", "synthesis"]
    np.testing.assert_allclose(text_vectors[0], one[table["description"][0].as_py()], atol=1e-5)
    mean = one[r1] + one[r2]
    np.testing.assert_allclose(text_vectors[1], mean / np.linalg.norm(mean), atol=1e-5)
    assert list(zip(synth_cols["recipe_id"].to_pylist(), synth_cols["material_id"].to_pylist())) == [
        ("rcp-3", "a"), ("rcp-1", "b"), ("rcp-2", "b")]
    np.testing.assert_allclose(synth_vectors, np.stack([one[r3], one[r1], one[r2]]), atol=1e-5)
    # validation (and evaluation) embed a material's text exactly this way: its deterministic batch, pooled
    from cmma_cli.modalities.base import Context
    from cmma_cli.modalities.batches import MaterialSet

    materials = MaterialSet(table, {"text": encoder.spec["encoders"]["text"]}, Context({}, cache_dir=ws.cache))
    batch = materials.collate(np.arange(3))
    validation = encoder.model.embed("text", batch["inputs"]["text"]).detach().numpy()
    np.testing.assert_allclose(validation, text_vectors, atol=1e-5)


# ------------------------------------------------------------------------------------ skip, force, options


def test_an_unchanged_embed_is_skipped_and_a_new_checkpoint_or_index_redoes_it(embedded_sample, tmp_path, capsys):
    ws = copy_ws(embedded_sample.ws, tmp_path)
    run = embedded_sample.run
    first = run_embed(ws, EmbedConfig(run=run))  # the copy's paths differ: embedded afresh
    again = run_embed(ws, EmbedConfig(run=run))
    assert again["created"] == first["created"] and "up to date" in capsys.readouterr().err
    ivf = run_embed(ws, EmbedConfig(run=run, checkpoint="last", index="ivf", nlist=2, nprobe=2))
    assert ivf["checkpoint"]["name"] == "last"
    assert ivf["indexes"]["structure"] == {"kind": "ivf", "vectors": ivf["counts"]["structure"], "nlist": 2, "nprobe": 2}
    index = load_index(ws.embeddings_dir(run) / "structure.faiss")
    assert type(index).__name__ == "IndexIVFFlat"
    _, vectors = stored(ws, run, "structure")
    scores, rows = index.search(vectors[:20], 5)  # every cell probed: the exact answer
    exact_scores, exact_rows = brute_force(vectors, vectors[:20], 5)
    np.testing.assert_allclose(scores, exact_scores, atol=1e-5)
    assert (rows[:, 0] == np.arange(20)).all()


def test_the_newest_finished_run_is_the_default(embedded_sample):
    ws = embedded_sample.ws
    assert resolve_checkpoint(ws, None, "best") == ("sample", ws.run_dir("sample"), ws.run_dir("sample") / "best.pt")
    path = ws.run_dir("sample") / "checkpoints" / "epoch-002.pt"
    assert resolve_checkpoint(ws, None, str(path)) == ("sample", ws.run_dir("sample"), path)


# --------------------------------------------------------------------------------------------- new inputs


def test_new_cifs_texts_and_patterns_are_embedded_without_retraining(embedded_sample, tmp_path):
    ws, run = embedded_sample.ws, embedded_sample.run
    before = manifest_hash(ws.processed), (ws.processed / "materials.parquet").stat().st_mtime_ns
    ids, structure_vectors = stored(ws, run, "structure")
    picks = ids[:3]
    folder = tmp_path / "mine"
    folder.mkdir()
    for mid in picks:
        (folder / f"{mid}.cif").write_text(cif_of(ws, mid))
    (folder / "broken.cif").write_text("data_broken\n_cell_length_a 3.0\nthis is not a CIF\n")
    processed = pq.read_table(ws.processed / "materials.parquet", columns=["material_id", "description"]).to_pandas()
    described = processed.dropna(subset=["description"]).iloc[0]
    texts = tmp_path / "texts.csv"
    texts.write_text(f"id,text\nmy-text,\"{described.description}\"\n")

    manifest = embed_inputs(ws, EmbedConfig(run=run), [folder, texts], name="mine")
    out = ws.embeddings_dir(run) / "inputs" / "mine"
    assert manifest["stage"] == "embed-inputs" and manifest["counts"]["structure"] == 3
    new_ids, new_vectors = read_vectors(out / "structure.parquet", ["material_id"])
    new_ids = new_ids.column("material_id").to_pylist()
    assert sorted(new_ids) == sorted(picks)
    for mid, vec in zip(new_ids, new_vectors):  # a CIF written from a material embeds like the material
        assert float(vec @ structure_vectors[ids.index(mid)]) > 0.999
    text_ids, text_vectors = read_vectors(out / "text.parquet", ["material_id"])
    stored_text = dict(zip(*stored(ws, run, "text")))
    assert text_ids.column("material_id").to_pylist() == ["my-text"]
    np.testing.assert_allclose(text_vectors[0], stored_text[described.material_id], atol=1e-5)
    assert read_vectors(out / "xrd.parquet")[1].shape == (3, embedded_sample.dim)  # computed from the CIFs
    unified = pq.read_table(out / "unified.parquet").to_pandas()
    assert dict(zip(unified["material_id"], unified["modalities"].map(list)))["my-text"] == ["text"]
    rejects = pq.read_table(out / "rejects.parquet").to_pandas()
    assert rejects["item"].tolist() == ["broken"] and "CIF" in rejects["reason"].iloc[0]
    materials = pq.read_table(out / "materials.parquet").to_pandas()
    assert set(materials["kind"]) == {"structure", "text"} and materials["formula"].notna().sum() == 3
    assert load_index(out / "unified.faiss").ntotal == 4
    assert (manifest_hash(ws.processed), (ws.processed / "materials.parquet").stat().st_mtime_ns) == before


def test_a_measured_pattern_named_like_a_cif_replaces_its_computed_one(embedded_sample, tmp_path):
    ws, run = embedded_sample.ws, embedded_sample.run
    processed = pq.read_table(ws.processed / "materials.parquet", columns=["material_id", "xrd"]).to_pandas()
    a, b = processed["material_id"].iloc[0], processed["material_id"].iloc[1]
    grid = np.linspace(10, 90, 1601)
    (tmp_path / f"{a}.cif").write_text(cif_of(ws, a))
    # a's file carries b's pattern: the xrd embedding must be b's, the structure embedding a's
    np.savetxt(tmp_path / f"{a}.xy", np.column_stack([grid, processed["xrd"].iloc[1]]))
    embed_inputs(ws, EmbedConfig(run=run), [tmp_path / f"{a}.cif", tmp_path / f"{a}.xy"], out=tmp_path / "out")
    xrd = dict(zip(*stored(ws, run, "xrd")))
    new_xrd = read_vectors(tmp_path / "out" / "xrd.parquet")[1]
    np.testing.assert_allclose(new_xrd[0], xrd[b], atol=1e-4)
    assert float(new_xrd[0] @ xrd[a]) < float(new_xrd[0] @ xrd[b])


def test_text_inputs_come_as_json_strings_objects_or_recipes_and_are_cleaned_like_processed_text(tmp_path):
    from cmma_cli.embed_inputs import collect_inputs
    from cmma_cli.preprocess.text import compose_procedure, normalize_text

    recipe = {"doi": "10.1/x", "synthesis_type": "solid-state", "target": {"material_formula": "LiCoO2"},
              "precursors": [{"material_formula": "Li2CO3"}, {"material_formula": "Co3O4"}],
              "operations": [{"type": "HeatingOperation", "token": "calcined",
                              "conditions": {"heating_temperature": [{"values": [900], "units": "°C"}]}}]}
    path = tmp_path / "queries.json"
    path.write_text(json.dumps(["Heated  at 1200 degrees C for 12 hrs.", {"id": "mine", "text": "A layered oxide."},
                                recipe, {"unrelated": 1}]))
    (tmp_path / "table.csv").write_text("name,description\nrow-a,Rock salt  structure.\nrow-b,\n")
    found = collect_inputs([path, tmp_path / "table.csv"]).read()["text"]  # what the text modality read
    texts = list(zip(found.ids, found.values["description"], [m["file"] for m in found.materials]))
    assert texts == [
        ("queries-0", normalize_text("Heated  at 1200 degrees C for 12 hrs."), str(path)),
        ("mine", "A layered oxide.", str(path)),
        (texts[2][0], compose_procedure(recipe, "solid-state"), str(path)),
        ("row-a", "Rock salt structure.", str(tmp_path / "table.csv")),
    ]
    assert texts[0][1] == "Heated at 1200 °C for 12 h."
    assert texts[2][0].startswith("rcp-") and "Li2CO3" in texts[2][1]
    assert [r["item"] for r in found.rejects] == [f"{path}:3", f"{tmp_path / 'table.csv'}:1"]


# ------------------------------------------------------------------------------------------ error sentences


def test_embed_without_a_finished_run_says_to_train_first(tmp_path, embedded_sample):
    ws = Workspace(tmp_path)
    with pytest.raises(CMMAError, match=r"No finished `preprocess` output .*run `cmma preprocess` first"):
        run_embed(ws, EmbedConfig())
    shutil.copytree(embedded_sample.ws.processed, ws.processed)
    with pytest.raises(CMMAError, match=r"no finished training run .*run `cmma train` first"):
        run_embed(ws, EmbedConfig())
    with pytest.raises(CMMAError, match=r"There is no run 'nope' .*finished runs: none yet"):
        run_embed(ws, EmbedConfig(run="nope"))


def test_embed_refuses_an_unfinished_run_a_missing_checkpoint_and_a_bad_index(embedded_sample, tmp_path):
    ws = copy_ws(embedded_sample.ws, tmp_path)
    with pytest.raises(CMMAError, match=r"The checkpoint .*nowhere.pt does not exist"):
        run_embed(ws, EmbedConfig(checkpoint=str(tmp_path / "nowhere.pt")))
    with pytest.raises(CMMAError, match=r"--index must be one of flat, ivf, not 'hnsw'"):
        run_embed(ws, EmbedConfig(index="hnsw"), force=True)
    (ws.run_dir("sample") / "manifest.json").unlink()
    with pytest.raises(CMMAError, match=r"Run 'sample' has not finished training .*--resume latest"):
        run_embed(ws, EmbedConfig(run="sample"))
    (ws.run_dir("sample") / "best.pt").unlink()
    with pytest.raises(CMMAError, match=r"Run 'sample' has no best.pt"):
        run_embed(ws, EmbedConfig(run="sample"))


def test_unusable_inputs_get_one_sentence(embedded_sample, tmp_path):
    ws, run = embedded_sample.ws, embedded_sample.run
    with pytest.raises(CMMAError, match=r"does not exist: check the path given to --input"):
        embed_inputs(ws, EmbedConfig(run=run), [tmp_path / "missing.cif"])
    bad = tmp_path / "bad.cif"
    bad.write_text("not a cif at all")
    with pytest.raises(CMMAError, match=r"None of the 1 structures could be read"):
        embed_inputs(ws, EmbedConfig(run=run), [bad])
    odd = tmp_path / "notes.docx"
    odd.write_bytes(b"\x00\x01")
    with pytest.raises(CMMAError, match=r"Don't know how to embed .*notes.docx"):
        embed_inputs(ws, EmbedConfig(run=run), [odd])
    image = tmp_path / "micrograph.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(CMMAError, match=r"Run 'sample' was not trained with the image modality"):
        embed_inputs(ws, EmbedConfig(run=run), [image])


def test_the_tables_named_in_the_contract_are_the_ones_written(embedded_sample):
    out = embedded_sample.ws.embeddings_dir(embedded_sample.run)
    written = sorted(p.stem for p in out.glob("*.parquet"))
    trained = json.loads((embedded_sample.ws.run_dir(embedded_sample.run) / "manifest.json").read_text())["config"]["modalities"]
    untrained = {m for m in REGISTRY if m not in trained}  # the sample trains the default modalities
    assert untrained == {"composition", "image"}
    assert written == sorted(t for t in tables() if t not in untrained)
    assert sorted(p.stem for p in out.glob("*.faiss")) == written
