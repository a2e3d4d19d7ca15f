"""``cmma retrieve`` on the embedded built-in sample: a material's own CIF / pattern finds it first, its
description ranks it far above chance, --json has a fixed schema, filters hold, every error is one sentence."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from cmma_cli.config import RetrieveConfig
from cmma_cli.errors import CMMAError
from cmma_cli.index import brute_force, build_index, search
from cmma_cli.preprocess.text import normalize_text
from cmma_cli.retrieve import Query, Retriever, run_retrieve
from cmma_cli.workspace import Workspace


def cif_of(ws: Workspace, material_id: str) -> str:
    """The CIF of a raw material (its stored structure written by pymatgen)."""
    from pymatgen.core import Structure
    from pymatgen.io.cif import CifWriter

    raw = pq.read_table(ws.raw / "materials.parquet", columns=["material_id", "structure"]).to_pandas()
    text = raw.loc[raw["material_id"] == material_id, "structure"].iloc[0]
    return str(CifWriter(Structure.from_dict(json.loads(text))))


@pytest.fixture(scope="module")
def retriever(embedded_sample) -> Retriever:
    """One retriever for the module: indexes and model load once, as in a long-lived program."""
    return Retriever(embedded_sample.ws, embedded_sample.run)


@pytest.fixture(scope="module")
def processed(embedded_sample):
    return pq.read_table(embedded_sample.ws.processed / "materials.parquet",
                         columns=["material_id", "description", "crystal_system", "xrd"]).to_pandas()


# ------------------------------------------------------------------------------------------------ ranking


def test_a_materials_own_cif_finds_it_first(embedded_sample, retriever, processed, tmp_path):
    for mid in processed["material_id"].iloc[::60]:
        path = tmp_path / f"query-{mid}.cif"
        path.write_text(cif_of(embedded_sample.ws, mid))
        result = retriever.query(Query(structure=path), k=5)
        assert (result.source, result.target) == ("structure", "structure")
        assert result.rows[0]["material_id"] == mid and result.rows[0]["score"] > 0.999
        # the same CIF through its computed pattern and the XRD encoder finds it in the XRD index
        via_xrd = retriever.query(Query(structure=path), source="xrd", target="xrd", k=5)
        assert via_xrd.rows[0]["material_id"] == mid and via_xrd.rows[0]["score"] > 0.999


def test_a_measured_pattern_file_finds_its_material_first(retriever, processed, tmp_path):
    row = processed.iloc[17]
    path = tmp_path / "measured.xy"
    lines = ["# 2theta intensity (counts)"] + [f"{x:.2f} {1000 * y:.6f}" for x, y in zip(np.linspace(10, 90, 1601), row["xrd"])]
    path.write_text("\n".join(lines) + "\n")
    result = retriever.query(Query(pattern=path), target="xrd", k=3)
    assert result.source == "xrd" and result.rows[0]["material_id"] == row["material_id"]


def test_a_description_ranks_its_material_far_above_chance(retriever, processed):
    sample = processed.dropna(subset=["description"]).iloc[::7]
    n = retriever.index("structure").ntotal
    from cmma_cli.modalities.text.encoder import embed_texts

    queries = embed_texts(retriever.encoder(), [normalize_text(t) for t in sample["description"]])  # as a query is
    stored_ids, stored_vectors = retriever.vectors("text")
    # a typed query gets exactly the vector `cmma embed` stored for the same text (no cache, the model itself)
    np.testing.assert_allclose(retriever.encoder().embed_query("text", sample["description"].iloc[0]),
                               stored_vectors[stored_ids.get_loc(sample["material_id"].iloc[0])], atol=1e-4)
    np.testing.assert_allclose(queries, stored_vectors[stored_ids.get_indexer(sample["material_id"])], atol=1e-4)
    ranks = []
    for mid, vector in zip(sample["material_id"], queries):
        rows = retriever.search(vector, "structure", k=n)
        ranks.append([r["material_id"] for r in rows].index(mid) + 1)
    ranks = np.array(ranks)
    hit10, chance10 = float((ranks <= 10).mean()), 10 / n
    assert len(ranks) >= 40 and hit10 >= 6 * chance10, (hit10, chance10)
    assert np.median(ranks) <= n / 8  # chance: n / 2


def test_a_stored_material_is_a_query_too(retriever, processed):
    mid = processed["material_id"].iloc[3]
    same = retriever.query(Query(material=mid), k=3)
    assert same.source == "structure" and same.rows[0]["material_id"] == mid
    assert same.rows[0]["score"] == pytest.approx(1.0, abs=1e-5)
    ranks = []  # a text finds its own material's structure far above chance (one material's rank is noisy)
    for other in processed["material_id"].iloc[:20]:
        cross = retriever.query(Query(material=other), source="text", target="structure", k=len(processed))
        ranks.append([r["material_id"] for r in cross.rows].index(other))
    assert np.median(ranks) < len(processed) // 4, ranks
    unified = retriever.query(Query(material=mid), source="unified", target="unified", k=2)
    assert unified.rows[0]["material_id"] == mid and unified.rows[0]["modalities"] == ["structure", "text", "xrd"]


def test_the_model_and_indexes_load_once(retriever, processed):
    first = retriever.query(Query(text="A cubic rock-salt structure."), k=3)
    encoder = retriever.encoder()
    second = retriever.query(Query(text="A layered hexagonal structure."), k=3)
    assert retriever.encoder() is encoder and second.timing_ms["load"] == first.timing_ms["load"]
    assert second.timing_ms["encode"] > 0 and second.timing_ms["search"] > 0


# -------------------------------------------------------------------------------------- output, filters


def test_json_output_has_the_documented_schema(embedded_sample, capsys):
    run_retrieve(embedded_sample.ws, Query(text="Rock salt structure with octahedra."), RetrieveConfig(k=4), as_json=True)
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"run", "query", "from", "to", "k", "filters", "index_size", "timing_ms", "results"}
    assert doc["query"] == {"kind": "text", "value": "Rock salt structure with octahedra."}
    assert (doc["run"], doc["from"], doc["to"], doc["k"], doc["filters"]) == ("sample", "text", "structure", 4, [])
    assert set(doc["timing_ms"]) == {"load", "encode", "search"} and all(v >= 0 for v in doc["timing_ms"].values())
    assert [r["rank"] for r in doc["results"]] == [1, 2, 3, 4]
    scores = [r["score"] for r in doc["results"]]
    assert scores == sorted(scores, reverse=True) and all(-1.0001 <= s <= 1.0001 for s in scores)
    for r in doc["results"]:
        assert {"rank", "score", "material_id", "formula", "crystal_system", "band_gap",
                "formation_energy_per_atom", "energy_above_hull"} <= set(r)
        assert isinstance(r["material_id"], str) and isinstance(r["formula"], str)
        assert r["band_gap"] is None  # the sample has no band gaps: null, never NaN or a made-up number


def test_the_table_shows_rank_id_formula_score_and_crystal_system(embedded_sample, retriever, capsys):
    result = run_retrieve(embedded_sample.ws, Query(text="Rock salt structure."), RetrieveConfig(k=3))
    out = capsys.readouterr()
    for column in ("rank", "material", "formula", "score", "crystal system"):
        assert column in out.out
    for row in result.rows:
        assert row["material_id"] in out.out and row["formula"] in out.out
    assert "encode" in out.err and "search" in out.err


def test_property_filters_restrict_the_results(retriever, processed):
    cubic = retriever.query(Query(text="A structure."), k=8, filters=["crystal_system==cubic"])
    assert len(cubic.rows) == 8 and {r["crystal_system"] for r in cubic.rows} == {"cubic"}
    negative = retriever.query(Query(text="A structure."), k=5,
                               filters=["formation_energy_per_atom < -1", "crystal_system!=cubic"])
    assert negative.rows and all(r["formation_energy_per_atom"] < -1 and r["crystal_system"] != "cubic" for r in negative.rows)
    count = int((processed["crystal_system"] == "triclinic").sum())
    few = retriever.query(Query(text="A structure."), k=count + 20, filters=["crystal_system=triclinic"])
    assert len(few.rows) == count  # fewer qualify than asked: all of them, nothing else


@pytest.mark.parametrize("expr, message", [
    ("colour==red", r"Unknown property 'colour' in --filter: the processed data has .*band_gap"),
    ("band gap > 1", r"Cannot read the filter 'band gap > 1'"),
    ("crystal_system>3", r"crystal_system is not numeric"),
    ("formation_energy_per_atom==low", r"formation_energy_per_atom is numeric"),
])
def test_a_bad_filter_gets_one_sentence(retriever, expr, message):
    with pytest.raises(CMMAError, match=message):
        retriever.query(Query(text="A structure."), filters=[expr])


# ------------------------------------------------------------------------------------------ error sentences


def test_no_embeddings_yet_says_which_command_to_run(tmp_path, embedded_sample):
    with pytest.raises(CMMAError, match=r"There are no embeddings in .* yet: run `cmma embed` \(after `cmma train`\) first"):
        Retriever(Workspace(tmp_path))
    with pytest.raises(CMMAError, match=r"no embeddings for run 'nope' .*\(runs with embeddings: sample\): "
                                        r"run `cmma embed --run nope` first"):
        Retriever(embedded_sample.ws, "nope")


def test_an_unknown_material_id_gets_close_matches(retriever, processed):
    mid = str(processed["material_id"].iloc[0])
    with pytest.raises(CMMAError, match=rf"Unknown material id '{mid}x': .*\(close: {mid}"):
        retriever.query(Query(material=mid + "x"))


def test_unreadable_or_missing_files_get_one_sentence(retriever, tmp_path):
    bad = tmp_path / "bad.cif"
    bad.write_text("data_x\nloop_\n_atom_site_label\nnonsense\n")
    with pytest.raises(CMMAError, match=r"Could not read the CIF .*bad.cif .*pass a valid CIF file"):
        retriever.query(Query(structure=bad))
    with pytest.raises(CMMAError, match=r"The CIF file .*absent.cif does not exist"):
        retriever.query(Query(structure=tmp_path / "absent.cif"))
    noise = tmp_path / "noise.xy"
    noise.write_text("2theta intensity\nten twenty\n")
    with pytest.raises(CMMAError, match=r"Could not read the XRD pattern .*noise.xy: no numeric \(2-theta, intensity\) rows"):
        retriever.query(Query(pattern=noise))
    with pytest.raises(CMMAError, match=r"The pattern file .*absent.xy does not exist"):
        retriever.query(Query(pattern=tmp_path / "absent.xy"))


def test_a_modality_the_run_was_not_trained_with_is_named(retriever, tmp_path):
    image = tmp_path / "micrograph.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(CMMAError, match=r"Run 'sample' was not trained with the image modality \(it has structure, text, xrd\)"):
        retriever.query(Query(image=image))
    with pytest.raises(CMMAError, match=r"There is no image index for run 'sample' \(run 'sample' was not trained with image\)"):
        retriever.query(Query(text="A structure."), target="image")
    with pytest.raises(CMMAError, match=r"A text query is encoded as text, not xrd"):
        retriever.query(Query(text="A structure."), source="xrd")


def test_a_query_needs_exactly_one_input(retriever, tmp_path):
    with pytest.raises(CMMAError, match=r"Nothing to search for"):
        retriever.query(Query())
    with pytest.raises(CMMAError, match=r"Give one query at a time, not text and material"):
        retriever.query(Query(text="x", material="y"))
    with pytest.raises(CMMAError, match=r"The query text is empty"):
        retriever.query(Query(text="   \t"))


def test_a_checkpoint_changed_after_embedding_is_refused(embedded_sample, tmp_path):
    ws = embedded_sample.copy(tmp_path / "ws")
    from cmma_cli.config import EmbedConfig
    from cmma_cli.embed import run_embed

    manifest = run_embed(ws, EmbedConfig(run="sample"))
    with open(ws.locate(manifest["checkpoint"]["path"]), "ab") as fh:  # the copy's own checkpoint
        fh.write(b"retrained")
    with pytest.raises(CMMAError, match=r"changed after `cmma embed` ran: run `cmma embed --run sample --force`"):
        Retriever(ws).query(Query(text="A structure."))
    assert Retriever(ws).query(Query(material=str(pq.read_table(ws.embeddings_dir("sample") / "structure.parquet")
                                                  .column("material_id")[0]))).rows  # stored vectors need no model


# ----------------------------------------------------------------------------------------------- the index


def test_flat_and_ivf_search_agree_with_numpy_and_respect_a_row_filter():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(4000, 24)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:10] + 0.1 * rng.normal(size=(10, 24)).astype(np.float32)
    exact_scores, exact_rows = brute_force(vectors, queries, 7)
    scores, rows = search(build_index(vectors), queries, 7)
    np.testing.assert_array_equal(rows, exact_rows)
    np.testing.assert_allclose(scores, exact_scores, atol=1e-5)
    allowed = np.zeros(len(vectors), dtype=bool)
    allowed[1::3] = True
    _, kept = search(build_index(vectors), queries, 7, allowed)
    subset = np.flatnonzero(allowed)
    np.testing.assert_array_equal(kept, subset[brute_force(vectors[subset], queries, 7)[1]])
    ivf = build_index(vectors, "ivf", nlist=16, nprobe=16)  # every cell probed: exact
    np.testing.assert_array_equal(search(ivf, queries, 7)[1], exact_rows)
    _, kept_ivf = search(ivf, queries, 7, allowed)
    np.testing.assert_array_equal(kept_ivf, kept)


def test_an_empty_answer_and_a_bad_thread_count_are_said_plainly(embedded_sample, capsys):
    import faiss
    import torch

    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    try:
        result = run_retrieve(embedded_sample.ws, Query(text="A structure."),
                              RetrieveConfig(filters=["crystal_system==icosahedral"], threads=1))
        assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (1, 1)
    finally:  # the setting is per process: give the rest of the session its threads back
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])
    assert result.rows == [] and "passes the filters crystal_system==icosahedral: loosen them" in capsys.readouterr().err
    with pytest.raises(CMMAError, match=r"--threads must be at least 1, not 0"):
        Retriever(embedded_sample.ws, threads=0)
