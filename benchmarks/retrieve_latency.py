"""Latency of a first and a warm answer: cold ``cmma retrieve``, the warm Python API and ``cmma serve`` over HTTP.

    .venv/bin/python benchmarks/retrieve_latency.py -w data/demo --run demo
    .venv/bin/python benchmarks/retrieve_latency.py -w data/demo --run demo --repeats 5 --out latency.json

For each query kind (a material id, a CIF, a measured pattern, a typed text), side by side:

- **cold CLI**: wall time of a whole ``cmma retrieve ... --json`` process (Python start, imports, loading the
  index and the models, encoding, search), median of ``--repeats`` runs, and whether that process imported the
  text stack (``sentence_transformers``) or torch (checked with ``python -X importtime``). A frozen text model is
  run from its traced copy in the workspace cache (``cache/text/traced/``, written by ``cmma embed`` or by the
  first text query that lacks it): the table says whether the copy was there before the first text query ran;
- **warm API**: ``cmma_cli.load(...).search(...)`` after one query of each kind (median, ms);
- **HTTP**: ``GET /search`` / ``POST /search`` (file upload) against ``cmma serve --threads 1`` started here on a
  free loopback port (median round trip, ms).

The queries: the first material of the run's index, its structure written as a CIF, the pattern file shipped with
the tests (``tests/fixtures/xrd/TiO2_measured.xy``) and a rock-salt description. ``--threads`` sets the CPU
threads of the CLI and API queries (1 is fastest on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATTERN = ROOT / "tests" / "fixtures" / "xrd" / "TiO2_measured.xy"
TEXT = "Rock salt structure: sodium is bonded to six equivalent chlorine atoms forming edge-sharing octahedra."
CMMA = [sys.executable, "-m", "cmma_cli"]


def queries(ws: Path, run: str, tmp: Path) -> dict[str, tuple[list[str], object]]:
    """``{kind: (cmma retrieve arguments, the API's query)}``."""
    import pyarrow.parquet as pq
    from pymatgen.core import Structure

    ids = pq.read_table(ws / "embeddings" / run / "structure.parquet", columns=["material_id"]).column(0)
    material = ids[0].as_py()
    raw = pq.read_table(ws / "raw" / "materials.parquet", columns=["material_id", "structure"]).to_pylist()
    structure = next(Structure.from_dict(json.loads(r["structure"])) for r in raw if r["material_id"] == material)
    cif = tmp / "query.cif"
    structure.to(filename=str(cif))
    return {"material": (["--material", material], material), "structure": (["--structure", str(cif)], cif),
            "pattern": (["--pattern", str(PATTERN)], PATTERN), "text": ([TEXT], TEXT)}


def traced_state(ws: Path, run: str) -> str:
    """Whether the run's frozen text model has its traced copy in the workspace cache (``ok``), or why not."""
    from cmma_cli.modalities.text import fast
    from cmma_cli.workspace import Workspace

    manifest = json.loads((ws / "embeddings" / run / "manifest.json").read_text())
    if "text" not in manifest.get("modalities", []):
        return "no text modality"
    from cmma_cli.model import read_checkpoint

    spec = read_checkpoint(Workspace(ws).locate(manifest["checkpoint"]["path"]))["spec"]["encoders"]["text"]
    if spec.get("tune", "frozen") != "frozen":
        return f"none (text tune {spec['tune']})"
    return fast.load(ws / "cache", spec["model"], spec["max_length"])[1]


def cold_cli(ws: Path, run: str, args: list[str], repeats: int, threads: int) -> dict:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([*CMMA, "retrieve", *args, "-w", str(ws), "--run", run, "-k", "5", "--threads", str(threads),
                        "--json"], check=True, capture_output=True, env=env)
        times.append(time.perf_counter() - started)
    imported = subprocess.run([sys.executable, "-X", "importtime", "-m", "cmma_cli", "retrieve", *args, "-w", str(ws),
                               "--run", run, "-k", "5", "--threads", str(threads), "--json"],
                              capture_output=True, text=True, env=env).stderr
    names = {line.rsplit("|", 1)[-1].strip() for line in imported.splitlines() if line.startswith("import time:")}
    return {"median_s": statistics.median(times), "runs_s": [round(t, 3) for t in times],
            "imports_text_stack": "sentence_transformers" in names, "imports_torch": "torch" in names}


def warm_api(ws: Path, run: str, cases: dict, repeats: int, threads: int) -> tuple[dict, float]:
    import cmma_cli

    started = time.perf_counter()
    session = cmma_cli.load(ws, run=run, threads=threads)
    session.warm()
    load = time.perf_counter() - started
    out = {}
    for kind, (_, query) in cases.items():
        session.search(query, k=5)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            session.search(query, k=5)
            times.append(time.perf_counter() - t0)
        out[kind] = {"median_ms": statistics.median(times) * 1000}
    return out, load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(ws: Path, run: str, cases: dict, repeats: int) -> tuple[dict, float]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    server = subprocess.Popen([*CMMA, "serve", "-w", str(ws), "--run", run, "--port", str(port), "--threads", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=1).read()
                break
            except OSError:
                if server.poll() is not None or time.perf_counter() - started > 300:
                    raise RuntimeError("cmma serve did not start")
                time.sleep(0.2)
        ready = time.perf_counter() - started
        out = {}
        for kind, (_, query) in cases.items():
            if isinstance(query, Path):
                boundary = uuid.uuid4().hex
                body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{query.name}"\r\n\r\n'
                        .encode() + query.read_bytes() + f"\r\n--{boundary}\r\nContent-Disposition: form-data; "
                        f'name="k"\r\n\r\n5\r\n--{boundary}--\r\n'.encode())

                def ask(body=body, boundary=boundary):
                    request = urllib.request.Request(base + "/search", data=body, headers={
                        "Content-Type": f"multipart/form-data; boundary={boundary}"})
                    return urllib.request.urlopen(request, timeout=60).read()
            else:
                def ask(query=query):
                    return urllib.request.urlopen(base + "/search?" + urllib.parse.urlencode({"q": query, "k": 5}),
                                                  timeout=60).read()
            ask()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                ask()
                times.append(time.perf_counter() - t0)
            out[kind] = {"median_ms": statistics.median(times) * 1000}
        return out, ready
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-w", "--workspace", type=Path, default=ROOT / "data" / "demo")
    parser.add_argument("--run", default="demo")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each cold command / warm query")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the CLI and API queries")
    parser.add_argument("--out", type=Path, help="write the numbers as JSON here")
    args = parser.parse_args()
    ws = args.workspace.resolve()
    from rich.table import Table

    from cmma_cli.console import console

    load_before = os.getloadavg()[0]
    traced = traced_state(ws, args.run)
    with tempfile.TemporaryDirectory() as tmp:
        cases = queries(ws, args.run, Path(tmp))
        cold = {kind: cold_cli(ws, args.run, cli_args, args.repeats, args.threads) for kind, (cli_args, _) in cases.items()}
        warm, api_load = warm_api(ws, args.run, cases, max(args.repeats, 5), args.threads)
        served, ready = http(ws, args.run, cases, max(args.repeats, 5))
    table = Table(title=f"Query latency, run {args.run} of {ws} ({os.cpu_count()} CPUs, load average "
                        f"{os.getloadavg()[0]:.1f})", title_justify="left")
    for header in ("query", "cold `cmma retrieve` (s)", "imports text stack", "imports torch", "warm API (ms)",
                   "HTTP `cmma serve` (ms)"):
        table.add_column(header, justify="left" if header in ("query",) else "right")
    for kind in cases:
        table.add_row(kind, f"{cold[kind]['median_s']:.2f}", "yes" if cold[kind]["imports_text_stack"] else "no",
                      "yes" if cold[kind]["imports_torch"] else "no", f"{warm[kind]['median_ms']:.1f}",
                      f"{served[kind]['median_ms']:.1f}")
    console.print(table)
    console.print(f"warm API load (every index and model): {api_load:.1f} s; `cmma serve` ready after {ready:.1f} s")
    console.print(f"traced text model before the first text query: {traced}; load average {load_before:.1f} at the "
                  "start")
    if args.out:
        shown = ws.relative_to(ROOT).as_posix() if ws.is_relative_to(ROOT) else ws.name  # no absolute paths
        args.out.write_text(json.dumps({"workspace": shown, "run": args.run, "python": platform.python_version(),
                                        "cpus": os.cpu_count(), "load_average": os.getloadavg()[0],
                                        "load_average_start": load_before, "traced_text_model": traced,
                                        "threads": args.threads, "cold_cli": cold, "warm_api_ms": warm,
                                        "http_ms": served, "api_load_s": api_load, "serve_ready_s": ready},
                                       indent=2) + "\n")


if __name__ == "__main__":
    main()
