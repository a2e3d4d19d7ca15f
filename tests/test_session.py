"""The Python API (``cmma_cli.load``): the same answers as ``cmma retrieve``, from any kind of input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "xrd"


@pytest.fixture(scope="module")
def session(embedded_sample):
    import cmma_cli

    return cmma_cli.load(embedded_sample.ws.root, run=embedded_sample.run, threads=1)


@pytest.fixture(scope="module")
def material(embedded_sample):
    """A material of the sample, its structure and its processed pattern."""
    from pymatgen.core import Structure

    raw = pq.read_table(embedded_sample.ws.raw / "materials.parquet", columns=["material_id", "structure"]).slice(3, 1)
    row = raw.to_pylist()[0]
    processed = pq.read_table(embedded_sample.ws.processed / "materials.parquet", columns=["material_id", "xrd"])
    xrd = dict(zip(processed.column("material_id").to_pylist(), processed.column("xrd").to_pylist()))
    return row["material_id"], Structure.from_dict(json.loads(row["structure"])), np.asarray(xrd[row["material_id"]])


def test_import_cmma_cli_stays_light():
    code = "import sys, cmma_cli; print(int('torch' in sys.modules), int('pandas' in sys.modules), callable(cmma_cli.load))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "0", "True"]


def test_structures_encode_alike_from_an_object_a_path_and_cif_text(session, material, tmp_path):
    mid, structure, _ = material
    path = tmp_path / "query.cif"
    structure.to(filename=str(path))
    vectors = session.encode(structures=[structure, path, str(path), path.read_text()])
    assert vectors.shape == (4, session.retriever.encoder().dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, np.repeat(vectors[:1], 4, axis=0), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    ids, stored = session.vectors("structure")  # the vector `cmma embed` stored for the same material
    assert float(vectors[0] @ stored[ids.get_indexer([mid])[0]]) > 0.999


def test_a_pattern_on_the_grid_gives_the_stored_vector_and_a_file_equals_its_array(session, material):
    mid, _, pattern = material
    ids, stored = session.vectors("xrd")
    on_grid = session.encode(patterns=pattern)[0]
    assert float(on_grid @ stored[ids.get_indexer([mid])[0]]) > 0.999
    xy = np.loadtxt(FIXTURES / "TiO2_measured.xy", comments="#")[:, :2]
    from_file, from_array = session.encode(patterns=[FIXTURES / "TiO2_measured.xy", xy])
    assert float(from_file @ from_array) > 0.9999


def test_search_takes_texts_ids_paths_structures_and_vectors(session, material, tmp_path):
    mid, structure, _ = material
    by_id = session.search(mid, k=3)
    assert list(by_id.columns[:3]) == ["rank", "score", "material_id"]
    assert by_id["material_id"].iloc[0] == mid and by_id.attrs["query"]["kind"] == "material"
    by_object = session.search(structure, k=3)
    path = tmp_path / "q.cif"
    structure.to(filename=str(path))
    by_path = session.search(str(path), k=3)
    assert list(by_object["material_id"]) == list(by_path["material_id"])
    assert by_path.attrs["query"]["kind"] == "structure"
    by_pattern = session.search(FIXTURES / "TiO2_measured.xy", k=2, to="unified")
    assert by_pattern.attrs["from"] == "xrd" and len(by_pattern) == 2
    ids, stored = session.vectors("structure")
    by_vector = session.search(stored[ids.get_indexer([mid])[0]], k=1, to="structure")
    assert by_vector["material_id"].iloc[0] == mid
    text = session.search("Rock salt structure: sodium is bonded to six chlorine atoms", k=4, to="text")
    assert text.attrs["query"]["kind"] == "text" and len(text) == 4 and text["score"].is_monotonic_decreasing


def test_search_filters_and_the_cli_give_the_same_rows(session, embedded_sample, cli):
    text = "Solid-state synthesis of an oxide at 900 C"
    rows = session.search(text, k=5, filter="crystal_system==cubic")
    assert set(rows["crystal_system"]) <= {"cubic"}
    out = cli("retrieve", text, "-w", embedded_sample.ws.root, "--run", embedded_sample.run, "-k", "5",
              "--filter", "crystal_system==cubic", "--json")
    assert [r["material_id"] for r in json.loads(out.stdout)["results"]] == list(rows["material_id"])


def test_embeddings_material_pages_and_the_map(session, material):
    mid, _, _ = material
    table = session.embeddings("structure")
    assert {"material_id", "embedding"} <= set(table.columns) and len(table["embedding"].iloc[0]) == session.retriever.encoder().dim
    page = session.material(mid, k=3)
    assert page["properties"]["formula"] and page["cell"]["nsites"] == len(page["cell"]["sites"])
    assert set(page["neighbours"]) == set(page["tables"]) and all(len(v) == 3 for v in page["neighbours"].values())
    assert all(h["material_id"] != mid for hits in page["neighbours"].values() for h in hits)
    points = session.map()
    assert {"material_id", "x", "y", "method", "crystal_system"} <= set(points.columns)
    assert points["method"].iloc[0] == "pca" and np.isfinite(points[["x", "y"]].to_numpy()).all()


def test_identify_wraps_the_identifier(session):
    found = session.identify(FIXTURES / "TiO2_measured.xy", elements=["Ti", "O"], max_phases=1)
    assert found.phases and found.phases[0]["formula"] == "TiO2"


def test_bad_inputs_are_one_sentence(session):
    from cmma_cli.errors import CMMAError

    with pytest.raises(CMMAError, match="Nothing to encode"):
        session.encode()
    with pytest.raises(CMMAError, match="pattern array"):
        session.encode(patterns=np.ones(7))
    with pytest.raises(CMMAError, match="no nope embeddings"):
        session.embeddings("nope")
    with pytest.raises(CMMAError, match="unknown options"):
        session.identify(FIXTURES / "TiO2_measured.xy", colour="red")
