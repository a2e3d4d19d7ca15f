"""``cmma fetch --source mp``: the real mp-api client against a loopback Materials Project API.

The server (tests/mp_server.py) serves real mp20 structures and properties, real text-mined recipes
and real robocrys descriptions, logs every request and can fail on demand.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pandas as pd
import pytest
from mp_server import TEST_API_KEY, LoopbackMP, cut_paragraph
from pymatgen.core import Structure

from cmma_cli.config import FetchConfig
from cmma_cli.errors import CMMAError
from cmma_cli.sources import materials_project as mp
from cmma_cli.sources.materials_project import FIELDS, fetch_materials_project
from cmma_cli.sources.recipes import recipe_id, reduced_formula, target_formula


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    """Backoff of milliseconds and three attempts, so failure tests take no time."""
    monkeypatch.setattr(mp, "RETRY_BASE_DELAY_S", 0.01)
    monkeypatch.setattr(mp, "RETRY_ATTEMPTS", 3)


def config(server: LoopbackMP | str, **kw) -> FetchConfig:
    kw.setdefault("chunk_size", 25)
    kw.setdefault("synthesis", False)
    kw.setdefault("descriptions", False)
    endpoint = server if isinstance(server, str) else server.url
    return FetchConfig(source="mp", endpoint=endpoint, **kw)


def served(content, **where) -> list[dict]:
    """Summary docs of the server's content that pass simple predicates, in the server's order."""
    docs = content.summary
    for key, pred in where.items():
        docs = [d for d in docs if pred(d[key])]
    return docs


# -------------------------------------------------------------------------------- rows and shapes


def test_rows_carry_the_served_structures_and_properties(mp_server, mp_content, tmp_path):
    raw = fetch_materials_project(config(mp_server, elements=["O"]), TEST_API_KEY, tmp_path)

    expected = served(mp_content, elements=lambda els: "O" in els)
    assert list(raw.materials["material_id"]) == [d["material_id"] for d in expected]
    table = mp_content.table.set_index("material_id")
    for row in raw.materials.itertuples():
        csv = table.loc[row.material_id]
        doc = next(d for d in expected if d["material_id"] == row.material_id)
        structure = Structure.from_str(row.structure, fmt="json")
        assert structure.composition.reduced_formula == reduced_formula(csv["pretty_formula"]) == row.formula
        assert row.nsites == len(structure) and "O" in row.elements
        assert row.formation_energy_per_atom == pytest.approx(csv["formation_energy_per_atom"])
        assert row.band_gap == pytest.approx(csv["band_gap"])
        assert row.energy_above_hull == pytest.approx(csv["e_above_hull"])
        assert row.is_stable == (csv["e_above_hull"] <= 0)
        assert row.spacegroup_number == doc["symmetry"]["number"]
        assert row.spacegroup_symbol == doc["symmetry"]["symbol"]
        assert row.crystal_system == doc["symmetry"]["crystal_system"].lower()  # pymatgen's spelling
        assert row.density == pytest.approx(structure.density, rel=1e-6)
        assert row.source == "mp"
    assert raw.materials["bulk_modulus_vrh"].isna().all()  # mp20 has no elastic data
    assert raw.synthesis.empty and raw.descriptions.empty and raw.rejects == []

    # what the client asked for: the ids first, then chunks of full docs; no other route
    summary = mp_server.routed("summary")
    listing, chunks = summary[0].params, summary[1:]
    assert listing["_fields"] == ["material_id"] and listing["elements"] == ["O"]
    assert listing["deprecated"] == ["False"]  # always a criterion: mp-api never goes to S3
    assert len(chunks) == -(-len(expected) // 25)
    for req in chunks:
        assert req.params["_fields"] == [",".join(FIELDS)]
        assert len(req.params["material_ids"][0].split(",")) <= 25
        assert req.api_key == TEST_API_KEY
    assert {r.route for r in mp_server.requests} == {"heartbeat", "summary"}  # --no-synthesis --no-descriptions


@pytest.mark.parametrize(
    "filters, predicate",
    [
        ({"elements": ["Li", "O"]}, lambda d: {"Li", "O"} <= set(d["elements"])),
        ({"max_sites": 4}, lambda d: d["nsites"] <= 4),
        ({"elements": ["O"], "stable_only": True}, lambda d: "O" in d["elements"] and d["is_stable"]),
        ({"chemsys": "V-O-F"}, lambda d: d["chemsys"] == "F-O-V"),
    ],
    ids=["elements", "max-sites", "stable-only", "chemsys"],
)
def test_filters_select_what_the_api_selects(mp_server, mp_content, tmp_path, filters, predicate):
    expected = [d["material_id"] for d in mp_content.summary if predicate(d)]
    assert expected, "the served sample must hold materials for this filter"
    raw = fetch_materials_project(config(mp_server, **filters), TEST_API_KEY, tmp_path)
    assert list(raw.materials["material_id"]) == expected


def test_limit_takes_the_first_materials_and_pages_no_further(mp_server, mp_content, tmp_path):
    raw = fetch_materials_project(config(mp_server, limit=7), TEST_API_KEY, tmp_path)
    assert list(raw.materials["material_id"]) == [d["material_id"] for d in mp_content.summary[:7]]
    listing = mp_server.routed("summary")[0].params
    assert listing["_limit"] == ["7"] and "_skip" not in listing
    assert mp_server.count("summary") == 2  # the listing and one chunk


def test_moduli_come_from_the_vrh_averages(mp_server, mp_content, tmp_path):
    doc = mp_content.summary[3]
    mp_server.overrides[doc["material_id"]] = {  # a test value the server adds to this one document
        "bulk_modulus": {"voigt": 151.0, "reuss": 150.0, "vrh": 150.5},
        "shear_modulus": {"voigt": 81.0, "reuss": 79.5, "vrh": 80.25},
    }
    raw = fetch_materials_project(config(mp_server, chemsys=doc["chemsys"]), TEST_API_KEY, tmp_path)
    row = raw.materials.set_index("material_id").loc[doc["material_id"]]
    assert row["bulk_modulus_vrh"] == 150.5 and row["shear_modulus_vrh"] == 80.25
    others = raw.materials[raw.materials["material_id"] != doc["material_id"]]
    assert others["bulk_modulus_vrh"].isna().all()


# ------------------------------------------------------------------- recipes and descriptions


@pytest.fixture(scope="module")
def full_fetch(mp_content, tmp_path_factory):
    """Everything the server has, with recipes and descriptions (fetched once for the tests below)."""
    server = LoopbackMP(mp_content).start()
    try:
        cfg = FetchConfig(source="mp", endpoint=server.url, chunk_size=100)
        raw = fetch_materials_project(cfg, TEST_API_KEY, tmp_path_factory.mktemp("partial"))
        return raw, list(server.requests)
    finally:
        server.stop()


def test_recipes_link_by_material_id_else_by_formula(full_fetch, mp_content):
    raw, requests = full_fetch
    links = raw.synthesis
    ids = set(raw.materials["material_id"])
    formula_of = dict(zip(raw.materials["material_id"], raw.materials["formula"]))

    # one synthesis search per distinct formula (the endpoint takes one target_formula)
    asked = {r.params["target_formula"][0] for r in requests if r.route == "synthesis"}
    assert asked == set(raw.materials["formula"])

    # expected from the served recipes: a recipe naming one of our ids links to it, else to its formula
    # (ids are hashed from the record as served, whose paragraph the endpoint cuts to 100 characters)
    expected = set()
    for doc in mp_content.synthesis:
        rid = recipe_id({**doc, "paragraph_string": cut_paragraph(doc["paragraph_string"])})
        mp_id = doc["target"].get("mp_id")
        if mp_id in ids:
            expected.add((rid, mp_id, "mp_id"))
        else:
            red = reduced_formula(target_formula(doc))
            expected |= {(rid, m, "formula") for m, f in formula_of.items() if f == red}
    assert set(zip(links["recipe_id"], links["material_id"], links["link_method"])) == expected
    assert len(links) == len(expected)
    assert set(links["link_method"]) == {"mp_id", "formula"}

    for link in links.itertuples():
        record = json.loads(link.record)
        assert link.doi == record["doi"] and link.target_formula == target_formula(record)
        if link.link_method == "mp_id":
            assert record["target"]["mp_id"] == link.material_id
        else:
            assert reduced_formula(link.target_formula) == formula_of[link.material_id]
            assert record["target"].get("mp_id") not in ids
        # the endpoint's layout: typed operations, paragraphs cut to 100 characters
        assert {op["type"] for op in record["operations"]} <= {
            "StartingSynthesis", "MixingOperation", "ShapingOperation", "DryingOperation",
            "HeatingOperation", "QuenchingOperation",
        }
        assert len(record["paragraph_string"] or "") <= 103


def test_descriptions_are_the_robocrys_texts_of_fetched_materials(full_fetch, mp_content):
    raw, requests = full_fetch
    texts = {d["material_id"]: d["description"] for d in mp_content.robocrys}
    assert len(raw.descriptions) == len(texts) == 24
    assert dict(zip(raw.descriptions["material_id"], raw.descriptions["description"])) == texts
    assert set(raw.descriptions["source"]) == {"robocrys"}
    assert "LiTiO2 is H-Phase structured" in texts["mp-764648"]
    for req in (r for r in requests if r.route == "robocrys"):  # by id, not by keyword search
        assert req.path == "/materials/robocrys/"
        assert req.params["_fields"] == ["material_id,description"]
        assert len(req.params["material_ids"][0].split(",")) <= 100


def test_served_documents_validate_as_emmet_models(mp_server, mp_content):
    """The loopback server's shapes are the real API's: mp-api's own document models accept them."""
    from mp_api.client import MPRester

    with MPRester(TEST_API_KEY, endpoint=mp_server.url, mute_progress_bars=True) as mpr:
        ids = [d["material_id"] for d in mp_content.summary[:30]]
        docs = mpr.materials.summary.search(material_ids=ids, num_chunks=1, chunk_size=30)
        assert [str(d.material_id) for d in docs] == ids
        assert docs[0].structure.composition.reduced_formula == mp_content.summary[0]["formula_pretty"]
        recipes = mpr.materials.synthesis.search(target_formula="LiTiO2")
        assert recipes and all("LiTiO2" in r.targets_formula_s for r in recipes)
        robo = mpr.materials.robocrys.search_docs(material_ids=[d["material_id"] for d in mp_content.robocrys])
        assert len(robo) == 24 and robo[0].condensed_structure.dimensionality in (0, 1, 2, 3)


# -------------------------------------------------------------------- failures and resumption


def test_a_failure_midway_keeps_finished_chunks_and_a_rerun_fetches_only_the_rest(mp_server, mp_content, tmp_path):
    cfg = config(mp_server, elements=["O"], chunk_size=15)
    expected = [d["material_id"] for d in served(mp_content, elements=lambda els: "O" in els)]
    n_chunks = -(-len(expected) // 15)
    assert n_chunks >= 4
    mp_server.fail("summary", 503, first=4, count=None)  # listing + 2 chunks succeed, then an outage

    with pytest.raises(CMMAError) as err:
        fetch_materials_project(cfg, TEST_API_KEY, tmp_path)
    message = str(err.value)
    assert f"30 of {len(expected)} materials were fetched and kept" in message
    assert "HTTP 503" in message and "re-run the same command to continue" in message
    assert mp_server.count("summary") == 1 + 2 + 3  # three attempts at the third chunk

    mp_server.heal()
    mp_server.reset_log()
    raw = fetch_materials_project(cfg, TEST_API_KEY, tmp_path)
    assert list(raw.materials["material_id"]) == expected
    rerun = mp_server.routed("summary")
    assert len(rerun) == n_chunks - 2  # no listing, no finished chunk
    assert all("material_ids" in r.params for r in rerun)
    refetched = {m for r in rerun for m in r.params["material_ids"][0].split(",")}
    assert refetched == set(expected[30:])


def test_a_changed_config_starts_afresh(mp_server, mp_content, tmp_path):
    fetch_materials_project(config(mp_server, elements=["O"]), TEST_API_KEY, tmp_path)
    mp_server.reset_log()
    raw = fetch_materials_project(config(mp_server, elements=["O"], max_sites=8), TEST_API_KEY, tmp_path)
    expected = [d["material_id"] for d in mp_content.summary if "O" in d["elements"] and d["nsites"] <= 8]
    assert list(raw.materials["material_id"]) == expected
    assert mp_server.count("summary") == 1 + -(-len(expected) // 25)  # listed and fetched again


def test_synthesis_failure_keeps_materials_and_resumes_recipes(mp_server, mp_content, tmp_path, monkeypatch):
    monkeypatch.setattr(mp, "FORMULAS_PER_CHUNK", 10)
    cfg = config(mp_server, elements=["O"], chunk_size=100, synthesis=True)
    oxides = served(mp_content, elements=lambda els: "O" in els)
    first_formulas = sorted({d["formula_pretty"] for d in oxides})[:10]
    pages = sum(  # requests for the first chunk of formulas: pages of 10 recipes, at least one
        max(1, -(-sum(f in r["targets_formula_s"] for r in mp_content.synthesis) // 10)) for f in first_formulas
    )
    mp_server.fail("synthesis", 500, first=pages + 3, count=None)  # an outage in the second chunk
    with pytest.raises(CMMAError) as err:
        fetch_materials_project(cfg, TEST_API_KEY, tmp_path)
    assert f"all {len(oxides)} materials and the synthesis for 10 of" in str(err.value)
    assert "(or add --no-synthesis)" in str(err.value)

    mp_server.heal()
    mp_server.reset_log()
    raw = fetch_materials_project(cfg, TEST_API_KEY, tmp_path)
    formulas = sorted(set(raw.materials["formula"]))
    assert mp_server.count("summary") == 0  # materials came from the partial files
    asked = [r.params["target_formula"][0] for r in mp_server.routed("synthesis")]
    assert set(asked) == set(formulas[10:])  # the first chunk of 10 formulas was kept
    assert len(raw.synthesis) > 0


def test_transient_errors_are_retried(mp_server, tmp_path):
    mp_server.fail("summary", 503, first=2)  # mp-api does not retry a 503: our backoff does
    mp_server.fail("summary", 502, first=3)  # that retry gets a 502: mp-api's own session retries it
    mp_server.fail("summary", 0, first=5)  # the next chunk's connection drops: mp-api retries the read
    raw = fetch_materials_project(config(mp_server, elements=["O"]), TEST_API_KEY, tmp_path)
    n_chunks = -(-len(raw.materials) // 25)
    assert mp_server.count("summary") == 1 + n_chunks + 3


def test_a_heartbeat_hiccup_at_start_is_retried(mp_server, tmp_path):
    mp_server.fail("heartbeat", 503)
    raw = fetch_materials_project(config(mp_server, limit=3), TEST_API_KEY, tmp_path)
    assert len(raw.materials) == 3


@pytest.mark.parametrize(
    "exc, expected",
    [
        ("REST query returned with error status code 503 on URL http://h/materials/summary/?a=1 with message:\n"
         "Service Unavailable", ("transient", "HTTP 503")),
        ("REST query returned with error status code 429 on URL http://h/ with message:\nslow down",
         ("transient", "HTTP 429")),
        ("REST query returned with error status code 403 on URL http://h/ with message:\nForbidden", ("auth", "HTTP 403")),
        ("REST query returned with error status code 404 on URL http://h/x with message:\nNot Found",
         ("refused", "HTTP 404: Not Found")),
        ("The server does not support the request made to http://h/x. This may be due to an outdated mp-api package",
         ("refused", "HTTP 400: the server does not support this request")),
        ("HTTPConnectionPool(host='h', port=80): Max retries exceeded with url: /x (Caused by "
         "ResponseError('too many 502 error responses'))", ("transient", "HTTP 502")),
        ("HTTPConnectionPool(host='h', port=80): Max retries exceeded with url: /x (Caused by NewConnectionError("
         "'Failed to establish a new connection: [Errno 111] Connection refused'))", ("transient", "connection refused")),
    ],
)
def test_client_errors_are_classified_from_what_mp_api_raises(exc, expected):
    from mp_api.client.core.exceptions import MPRestError

    assert mp.classify(MPRestError(exc)) == expected


def test_other_exceptions_are_not_taken_for_api_failures():
    import requests

    assert mp.classify(ValueError("a bug")) is None
    assert mp.classify(requests.ConnectionError("Connection refused")) == ("transient", "connection refused")


def test_rejected_key_stops_at_once(mp_server, tmp_path):
    mp_server.api_key = "another-valid-looking-key-0123456"
    with pytest.raises(CMMAError, match=r"rejected the API key \(HTTP 401\).*MP_API_KEY / --api-key"):
        fetch_materials_project(config(mp_server), TEST_API_KEY, tmp_path)
    assert mp_server.count("summary") == 1  # no retries for a 4xx


@pytest.mark.parametrize(
    "key, sentence",
    [
        (None, r"No Materials Project API key: set the MP_API_KEY environment variable or pass --api-key"),
        ("   ", r"No Materials Project API key"),
        ("abcdefghijklmnop", r"has 16 characters but keys have 32 \(legacy 16-character keys no longer work\)"),
        ("x" * 31, r"has 31 characters but keys have 32: copy your key"),
    ],
)
def test_missing_or_malformed_key_is_one_sentence_before_any_request(mp_server, tmp_path, key, sentence):
    with pytest.raises(CMMAError, match=sentence):
        fetch_materials_project(config(mp_server), key, tmp_path)
    assert mp_server.requests == []


def test_unreachable_endpoint_is_retried_then_one_sentence(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    with pytest.raises(CMMAError) as err:
        fetch_materials_project(config(url), TEST_API_KEY, tmp_path)
    assert str(err.value) == (
        f"The Materials Project API at {url} kept failing (connection refused, 3 attempts): check your "
        "network connection and --endpoint, then re-run the same command to continue where it stopped."
    )


def test_an_endpoint_that_is_not_the_api(mp_server, tmp_path):
    url = mp_server.url + "not-the-api/"
    with pytest.raises(CMMAError, match=r"does not answer like the Materials Project API \(its /heartbeat returned HTTP 404\)"):
        fetch_materials_project(config(url), TEST_API_KEY, tmp_path)


def test_filters_that_match_nothing(mp_server, tmp_path):
    with pytest.raises(CMMAError, match=r"filters matched no materials \(--chemsys He-Ne --max-sites 3\): loosen"):
        fetch_materials_project(config(mp_server, chemsys="He-Ne", max_sites=3), TEST_API_KEY, tmp_path)
    with pytest.raises(CMMAError, match=r"'Xx' in --elements is not an element symbol"):
        fetch_materials_project(config(mp_server, elements=["Li", "Xx"]), TEST_API_KEY, tmp_path)
    assert mp_server.count("summary") == 1


# ---------------------------------------------------------------------------------------- CLI


def test_cli_fetch_from_the_materials_project(cli, mp_server, mp_content, tmp_path):
    ws = tmp_path / "ws"
    args = ["fetch", "--source", "mp", "--api-key", TEST_API_KEY, "--endpoint", mp_server.url,
            "--elements", "O", "--max-sites", "10", "--chunk-size", "20", "-w", ws]
    result = cli(*args)
    assert result.exit_code == 0, result.output

    expected = [d["material_id"] for d in mp_content.summary if "O" in d["elements"] and d["nsites"] <= 10]
    materials = pd.read_parquet(ws / "raw" / "materials.parquet")
    synthesis = pd.read_parquet(ws / "raw" / "synthesis.parquet")
    descriptions = pd.read_parquet(ws / "raw" / "descriptions.parquet")
    assert list(materials["material_id"]) == expected and set(materials["source"]) == {"mp"}
    assert set(synthesis["material_id"]) <= set(expected) and len(synthesis) > 0
    assert set(synthesis["link_method"]) <= {"mp_id", "formula"}
    robo = {d["material_id"] for d in mp_content.robocrys} & set(expected)
    assert set(descriptions["material_id"]) == robo
    manifest = json.loads((ws / "raw" / "manifest.json").read_text())
    assert manifest["stage"] == "fetch" and manifest["source"] == "mp"
    assert manifest["rows"]["materials"] == len(expected)
    assert manifest["rows"]["synthesis_links"] == len(synthesis)
    assert manifest["rows"]["descriptions"] == len(robo)
    assert manifest["config"]["elements"] == ["O"] and "api_key" not in json.dumps(manifest)
    assert "formation_energy_per_atom" in manifest["properties"]
    assert not (ws / "raw" / ".partial").exists()

    mp_server.reset_log()
    again = cli(*args)
    assert again.exit_code == 0 and "up to date" in again.output
    assert mp_server.requests == []


def test_cli_without_a_key_says_how_to_set_one(cli, mp_server, tmp_path):
    result = cli("fetch", "--source", "mp", "--endpoint", mp_server.url, "-w", tmp_path / "ws",
                 env={"MP_API_KEY": ""})
    assert result.exit_code == 2
    assert "MP_API_KEY" in result.output and "--api-key" in result.output
    assert not (Path(tmp_path) / "ws" / "raw" / "manifest.json").exists()
