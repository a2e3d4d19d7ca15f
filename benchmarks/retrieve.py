"""Query latency of ``cmma retrieve``: encoding and search timed apart, FAISS next to a numpy brute force.

    .venv/bin/python benchmarks/retrieve.py                          # the built-in sample, 100k-vector search
    .venv/bin/python benchmarks/retrieve.py -w data/demo --run NAME --sizes 100000,1000000 --out bench.json

Two parts, each query timed alone (one query at a time, as ``cmma retrieve`` asks), p50 / p95 in ms:

1. **Encoding**, with the real encoders of a trained run (``--run``; without one the built-in sample
   is fetched, preprocessed, trained for ``--epochs`` with the default model sizes and embedded into
   ``--workspace``): a text query (the sample's descriptions, cleaned as queries are), a CIF file
   (parse + crystal graph + structure encoder), a measured pattern file (read + grid + XRD encoder);
   then a whole ``Retriever.query`` (text -> structure index, properties joined) on the run's index.
2. **Search** on synthetic unit vectors (``--sizes``, default 100,000; ``--dim``, default 256, the
   default embedding width): clustered like real embeddings (a mixture of Gaussians), queries are
   new draws from the same mixture. Exact FAISS (``IndexFlatIP``, what ``cmma embed`` builds), a numpy
   brute force (one matrix-vector product + ``argpartition``) on the same queries, and the approximate
   IVF index (``--index ivf``) with its recall@10 against the exact answer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.table import Table

from cmma_cli.console import console
from cmma_cli.index import brute_force, build_index, search
from cmma_cli.workspace import Workspace, read_manifest


def percentiles(seconds: list[float]) -> dict[str, float]:
    """p50 / p95 / mean in milliseconds."""
    ms = np.asarray(seconds) * 1000
    return {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)), "mean": float(ms.mean()), "n": len(ms)}


def timed(fn, items) -> tuple[list[float], list]:
    times, outs = [], []
    for item in items:
        t0 = time.perf_counter()
        outs.append(fn(item))
        times.append(time.perf_counter() - t0)
    return times, outs


def ensure_run(ws: Workspace, run: str | None, epochs: int) -> str:
    """A run with embeddings in ``ws``: the one named, or the sample trained briefly at the default sizes."""
    from cmma_cli.config import EmbedConfig, FetchConfig, PreprocessConfig, TrainConfig
    from cmma_cli.embed import run_embed

    if run is not None:
        if read_manifest(ws.embeddings_dir(run)) is None:
            run_embed(ws, EmbedConfig(run=run))
        return run
    if read_manifest(ws.embeddings_dir("bench")) is not None:
        return "bench"
    from cmma_cli.fetch import run_fetch
    from cmma_cli.preprocess.pipeline import run_preprocess
    from cmma_cli.train import run_train

    if read_manifest(ws.processed) is None:
        run_fetch(ws, FetchConfig(source="sample"), api_key=None)
        run_preprocess(ws, PreprocessConfig())
    run_train(ws, TrainConfig(epochs=epochs), run="bench", force=True)
    run_embed(ws, EmbedConfig(run="bench"))
    return "bench"


def bench_encoding(ws: Workspace, run: str, queries: int, tmp: Path) -> tuple[dict, dict]:
    """Encode latencies per query kind, and the one-time loading costs."""
    import pyarrow.parquet as pq
    from pymatgen.core import Structure
    from pymatgen.io.cif import CifWriter

    from cmma_cli.retrieve import Query, Retriever

    t0 = time.perf_counter()
    retriever = Retriever(ws, run)
    encoder = retriever.encoder()
    t1 = time.perf_counter()
    encoder.embed_query("text", "warm-up")
    t2 = time.perf_counter()
    load = {"indexes + model (ms)": (t1 - t0) * 1000, "sentence model (ms)": (t2 - t1) * 1000}

    processed = pq.read_table(ws.processed / "materials.parquet", columns=["material_id", "description", "xrd"]).to_pandas()
    raw = pq.read_table(ws.raw / "materials.parquet", columns=["material_id", "structure"]).to_pandas()
    texts = [t for t in processed["description"].dropna().tolist()][:queries]
    out: dict[str, dict] = {}
    if "text" in encoder.modalities and texts:
        out["text (description)"] = percentiles(timed(lambda t: encoder.embed_query("text", t), texts)[0])
    cifs = []
    for i, (mid, js) in enumerate(zip(raw["material_id"][:queries], raw["structure"][:queries])):
        path = tmp / f"q{i}.cif"
        path.write_text(str(CifWriter(Structure.from_dict(json.loads(js)))))
        cifs.append(path)
    if "structure" in encoder.modalities:
        out["structure (CIF file)"] = percentiles(timed(lambda p: encoder.embed_query("structure", p), cifs)[0])
    if "xrd" in encoder.modalities:
        grid = np.linspace(10, 90, len(processed["xrd"].dropna().iloc[0]))
        patterns = []
        for i, pattern in enumerate(processed["xrd"].dropna().iloc[:queries]):
            path = tmp / f"q{i}.xy"
            np.savetxt(path, np.column_stack([grid, pattern]))
            patterns.append(path)
        out["xrd (pattern file)"] = percentiles(timed(lambda p: encoder.embed_query("xrd", p), patterns)[0])
    if "text" in encoder.modalities and texts:
        results = [retriever.query(Query(text=t), k=10) for t in texts]
        out["whole query: text -> structure"] = {
            "encode": percentiles([r.timing_ms["encode"] / 1000 for r in results]),
            "search": percentiles([r.timing_ms["search"] / 1000 for r in results]),
            "index_size": results[0].index_size,
        }
    return out, load


def synthetic(n: int, dim: int, seed: int = 0, spread: float = 1.5, clusters: int = 1000) -> np.ndarray:
    """``n`` unit vectors from a mixture of Gaussians (real embeddings cluster by chemistry); the mixture is
    fixed, ``seed`` picks the draws, ``spread`` is the within-cluster spread relative to the centres' (the
    larger, the harder for an approximate index)."""
    centres = np.random.default_rng(12345).normal(size=(clusters, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    vectors = centres[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def bench_search(n: int, dim: int, queries: int, k: int, nprobes: list[int], spread: float) -> dict:
    """Single-query latency of exact FAISS, numpy brute force and IVF on ``n`` synthetic vectors."""
    import faiss

    vectors = synthetic(n, dim, spread=spread)
    q = synthetic(queries, dim, seed=1, spread=spread)  # new materials from the same distribution
    t0 = time.perf_counter()
    flat = build_index(vectors)
    build_flat = time.perf_counter() - t0
    t0 = time.perf_counter()
    ivf = build_index(vectors, "ivf", nprobe=nprobes[0])
    build_ivf = time.perf_counter() - t0

    threads = faiss.omp_get_max_threads()
    flat_t, flat_out = timed(lambda v: search(flat, v[None, :], k)[1][0], q)
    faiss.omp_set_num_threads(1)  # on a busy machine, OpenMP threads waiting for each other cost more than they give
    flat1_t, _ = timed(lambda v: search(flat, v[None, :], k)[1][0], q)
    faiss.omp_set_num_threads(threads)
    numpy_t, numpy_out = timed(lambda v: brute_force(vectors, v[None, :], k)[1][0], q)
    out = {
        "n": n, "dim": dim, "k": k, "queries": queries, "spread": spread,
        f"faiss flat (exact, {threads} threads)": percentiles(flat_t),
        "faiss flat (exact, 1 thread)": percentiles(flat1_t),
        "numpy brute force": percentiles(numpy_t),
        "flat == numpy top-k": float(np.mean([set(a) == set(b) for a, b in zip(flat_out, numpy_out)])),
        "ivf recall@k": {},
        "build seconds": {"flat": build_flat, "ivf": build_ivf},
    }
    for nprobe in nprobes:
        ivf.nprobe = nprobe
        ivf_t, ivf_out = timed(lambda v: search(ivf, v[None, :], k)[1][0], q)
        name = f"faiss ivf (nlist {ivf.nlist}, nprobe {nprobe})"
        out[name] = percentiles(ivf_t)
        out["ivf recall@k"][name] = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ivf_out, flat_out)]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-w", "--workspace", type=Path, default=None, help="workspace (default: a temporary one)")
    parser.add_argument("--run", default=None, help="a trained run in the workspace (default: train the sample)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs when the sample is trained here")
    parser.add_argument("--queries", type=int, default=100, help="queries per measurement")
    parser.add_argument("--sizes", default="100000", help="synthetic index sizes, comma separated")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--nprobe", default="16,64", help="IVF cells searched per query, comma separated")
    parser.add_argument("--spread", type=float, default=1.5, help="within-cluster spread of the synthetic vectors")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch and faiss threads (default: theirs, one per core)")
    parser.add_argument("--skip-encoding", action="store_true", help="only the synthetic search part")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()

    import faiss
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    report: dict = {"machine": {"cpus": os.cpu_count(), "torch threads": torch.get_num_threads(),
                                "faiss threads": faiss.omp_get_max_threads(), "python": platform.python_version(),
                                "faiss": faiss.__version__, "torch": torch.__version__,
                                "cuda": torch.cuda.is_available(),
                                "load average at start": [round(x, 2) for x in os.getloadavg()]}}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_encoding:
            ws = Workspace((args.workspace or Path(tmp) / "ws").resolve())
            run = ensure_run(ws, args.run, args.epochs)
            files = Path(tmp) / "queries"
            files.mkdir()
            report["encoding"], report["load"] = bench_encoding(ws, run, args.queries, files)
            report["run"] = run
    nprobes = [int(x) for x in args.nprobe.split(",")]
    report["search"] = [bench_search(int(n), args.dim, args.queries, args.k, nprobes, args.spread)
                        for n in args.sizes.split(",")]
    print_report(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


def print_report(report: dict) -> None:
    m = report["machine"]
    console.print(f"{m['cpus']} CPUs (torch {m['torch threads']} threads, faiss {m['faiss threads']}), "
                  f"faiss {m['faiss']}, torch {m['torch']}, CUDA {m['cuda']}, load average at start "
                  f"{m['load average at start']}", highlight=False)
    if "encoding" in report:
        table = Table(title=f"Query encoding, one query at a time (run {report['run']})", title_justify="left")
        for col in ("query", "p50 ms", "p95 ms", "n"):
            table.add_column(col, justify="left" if col == "query" else "right")
        for name, stats in report["encoding"].items():
            if "p50" in stats:
                table.add_row(name, f"{stats['p50']:.1f}", f"{stats['p95']:.1f}", str(stats["n"]))
            else:
                for part in ("encode", "search"):
                    s = stats[part]
                    table.add_row(f"{name} ({stats['index_size']} vectors): {part}", f"{s['p50']:.2f}",
                                  f"{s['p95']:.2f}", str(s["n"]))
        console.print(table)
        console.print("One-time loading: " + ", ".join(f"{k} {v:.0f}" for k, v in report["load"].items()), highlight=False)
    for part in report["search"]:
        table = Table(title=f"Search, one query at a time: {part['n']:,} vectors x {part['dim']}, top {part['k']}",
                      title_justify="left")
        for col in ("method", "p50 ms", "p95 ms", "mean ms"):
            table.add_column(col, justify="left" if col == "method" else "right")
        for name, stats in part.items():
            if isinstance(stats, dict) and "p50" in stats:
                table.add_row(name, f"{stats['p50']:.2f}", f"{stats['p95']:.2f}", f"{stats['mean']:.2f}")
        console.print(table)
        recalls = ", ".join(f"{name.split('(')[1].rstrip(')')}: {r:.3f}" for name, r in part["ivf recall@k"].items())
        console.print(f"exact FAISS top-{part['k']} == numpy top-{part['k']} on {part['flat == numpy top-k']:.0%} of "
                      f"queries; IVF recall@{part['k']} against exact: {recalls}; build: flat "
                      f"{part['build seconds']['flat']:.2f} s, ivf {part['build seconds']['ivf']:.1f} s", highlight=False)


if __name__ == "__main__":
    main()
