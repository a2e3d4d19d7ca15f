"""``cmma serve``: the JSON API over real HTTP, and the page in a real headless browser (Debian's chromium driven
by Playwright; skipped with the reason when either is absent)."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

FIXTURES = Path(__file__).parent / "fixtures" / "xrd"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(embedded_sample):
    """``cmma serve``'s app on the sample, in a thread, on a free loopback port: its base URL."""
    from cmma_cli.serve import create_app
    from cmma_cli.session import Session

    session = Session(embedded_sample.ws, embedded_sample.run, threads=1)
    seconds = session.warm()
    port = free_port()
    config = uvicorn.Config(create_app(session, seconds), host="127.0.0.1", port=port, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not instance.started:
        if time.time() > deadline or not thread.is_alive():
            pytest.fail("the server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(10)


def call(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def post_json(url: str, body: dict) -> tuple[int, dict]:
    return call(url, json.dumps(body).encode(), {"Content-Type": "application/json"})


def post_form(url: str, fields: dict, files: dict[str, Path]) -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    parts = []
    for key, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    for key, path in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"; filename="{path.name}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return call(url, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})


@pytest.fixture(scope="module")
def a_material(embedded_sample):
    import pyarrow.parquet as pq

    return pq.read_table(embedded_sample.ws.processed / "materials.parquet", columns=["material_id"]).column(0)[5].as_py()


def test_health_search_and_material_pages(server, embedded_sample, a_material):
    status, health = call(f"{server}/health")
    assert status == 200 and health["run"] == embedded_sample.run and "structure" in health["tables"]
    text = "Rock salt structure: sodium is bonded to six chlorine atoms"
    status, found = call(f"{server}/search?" + urllib.parse.urlencode({"q": text, "k": 4, "to": "text"}))
    assert status == 200 and found["query"]["kind"] == "text" and len(found["results"]) == 4
    assert found["to"] == "text" and found["timing_ms"]["server"] >= found["timing_ms"]["encode"]
    status, same = post_json(f"{server}/search", {"query": text, "k": 4, "to": "text"})
    assert [r["material_id"] for r in same["results"]] == [r["material_id"] for r in found["results"]]
    status, by_id = call(f"{server}/search?" + urllib.parse.urlencode({"q": a_material, "k": 2}))
    assert by_id["results"][0]["material_id"] == a_material
    status, page = call(f"{server}/materials/{urllib.parse.quote(a_material, safe='')}?k=3")
    assert status == 200 and page["material_id"] == a_material and page["cell"]["nsites"] >= 1
    assert "structure" in page["neighbours"] and len(page["neighbours"]["structure"]) == 3
    status, points = call(f"{server}/map")
    assert status == 200 and points["method"] == "pca" and len(points["points"]) == health["materials"]


def test_uploads_search_encode_and_identify(server, embedded_sample, tmp_path):
    import pyarrow.parquet as pq
    from pymatgen.core import Structure

    row = pq.read_table(embedded_sample.ws.raw / "materials.parquet", columns=["material_id", "structure"]).slice(2, 1)
    mid, structure = row.column(0)[0].as_py(), Structure.from_dict(json.loads(row.column(1)[0].as_py()))
    cif = tmp_path / "mine.cif"
    structure.to(filename=str(cif))
    status, found = post_form(f"{server}/search", {"k": "3"}, {"file": cif})
    assert status == 200 and found["query"] == {"kind": "structure", "value": "mine.cif"}
    assert found["results"][0]["material_id"] == mid
    status, by_pattern = post_form(f"{server}/search", {"k": "2", "to": "unified"}, {"file": FIXTURES / "TiO2_measured.xy"})
    assert status == 200 and by_pattern["from"] == "xrd"
    status, vectors = post_json(f"{server}/encode", {"texts": ["a layered oxide", "a spinel"]})
    assert status == 200 and vectors["count"] == 2 and len(vectors["vectors"][0]) == vectors["dim"]
    status, one = post_form(f"{server}/encode", {}, {"file": cif})
    assert status == 200 and one["count"] == 1
    status, phases = post_form(f"{server}/identify", {"elements": "Ti,O", "max_phases": "1"},
                               {"file": FIXTURES / "TiO2_measured.xy"})
    assert status == 200 and phases["path"] == "TiO2_measured.xy" and phases["phases"][0]["formula"] == "TiO2"


def test_errors_are_one_sentence_with_a_status(server):
    status, body = call(f"{server}/search?q=x&to=bogus")
    assert status == 400 and "--to must be one of" in body["error"]
    status, body = call(f"{server}/materials/no-such-material")
    assert status == 404 and "Unknown material id" in body["error"]
    status, body = post_json(f"{server}/search", {"k": 3})
    assert status == 400 and "Nothing to search for" in body["error"]
    status, body = post_json(f"{server}/search", {"query": str(FIXTURES / "TiO2_measured.xy")})
    assert status == 400 and "upload the file" in body["error"]


def test_a_warm_text_query_answers_in_well_under_a_second(server):
    times = []
    for i in range(5):
        started = time.perf_counter()
        status, _ = call(f"{server}/search?" + urllib.parse.urlencode({"q": f"a layered oxide number {i}", "k": 5}))
        times.append(time.perf_counter() - started)
        assert status == 200
    assert sorted(times)[2] < 1.0  # 100 ms on a quiet machine; generous here, where other jobs share the cores


# ------------------------------------------------------------------------------------------ the page


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-background-networking", "--disable-gpu",
                                           "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield chromium
        chromium.close()


def test_the_page_searches_opens_a_material_and_draws_the_map(server, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server + "/")
    page.wait_for_selector("#map[data-ready='true']", timeout=30000)
    assert int(page.get_attribute("#map", "data-points")) > 10
    # the map has coloured pixels
    painted = page.evaluate("""() => { const c = document.getElementById('map');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }""")
    assert painted > 500
    page.fill("#q", "Rock salt structure: sodium is bonded to six chlorine atoms")
    page.click("#go")
    page.wait_for_selector("#results tbody tr.result", timeout=30000)
    rows = page.locator("#results tbody tr.result")
    assert rows.count() == 10
    first = rows.first.locator("a.material-link").inner_text()
    rows.first.locator("a.material-link").click()
    page.wait_for_selector("#material-neighbours table.neighbours", timeout=30000)
    assert first in page.inner_text("#material-title")
    assert page.locator("#material-properties tr").count() > 2
    assert "a = " in page.inner_text("#material-structure")
    # a neighbour's link opens that material
    neighbour = page.locator("#material-neighbours a.material-link").first
    other = neighbour.inner_text()
    neighbour.click()
    page.wait_for_function("id => document.getElementById('material-title').textContent.includes(id)", arg=other)
    # hovering a point shows it; clicking it opens its page
    page.click("#back")
    page.wait_for_selector("#search-panel:not([hidden])")
    page.locator("#map").scroll_into_view_if_needed()
    box = page.locator("#map").bounding_box()
    point = page.evaluate("""() => { const c = document.getElementById('map');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        for (let y = 0; y < c.height; y++) for (let x = 0; x < c.width; x++)
          if (d[(y * c.width + x) * 4 + 3] > 200) return [x, y, c.width, c.height]; return null; }""")
    assert point is not None
    x = box["x"] + (point[0] + 2) * box["width"] / point[2]
    y = box["y"] + (point[1] + 3) * box["height"] / point[3]
    page.mouse.move(x, y)
    page.wait_for_selector("#tooltip:not([hidden])", timeout=5000)
    assert page.inner_text("#tooltip").strip()
    page.mouse.click(x, y)
    page.wait_for_selector("#material:not([hidden])", timeout=10000)
    page.wait_for_selector("#material-neighbours table.neighbours", timeout=30000)
    # a file upload searches too
    page.click("#back")
    page.set_input_files("#file", str(FIXTURES / "TiO2_measured.xy"))
    page.click("#go")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('pattern')", timeout=30000)
    assert page.locator("#results tbody tr.result").count() == 10
    assert not errors, errors
