"""Benchmark `cmma preprocess`: graph building and XRD against the bare pymatgen calls, and the whole stage.

    .venv/bin/python benchmarks/preprocess.py                 # all parts, on ../shared/data/mp20/mp20_sample.csv
    .venv/bin/python benchmarks/preprocess.py --scales 1,4    # the stage on the sample, then on it 4 times over
    .venv/bin/python benchmarks/preprocess.py --stage-only --no-xrd --scales 1,4,16   # memory at 18k materials

1. Per core: structures/s of ``build_graph`` next to the bare ``Structure.get_neighbor_list`` call on the same
   parsed structures in the same run (the floor; target: within 1.5x), and of ``computed_pattern`` next to the
   bare ``XRDCalculator.get_pattern``. Each is timed ``--repeats`` times, interleaved, best run kept.
2. Linearity: graph building over the sample repeated 1, 2 and 4 times (microseconds per structure).
3. The stage: ``run_preprocess`` on a raw workspace holding the sample ``--scales`` times over (new ids), with
   one worker and with all cores, each in a fresh process: materials/s and peak memory (RSS).

Prints Markdown tables on stdout. Needs cmma installed (``pip install -e .``) and the real data beside the
repository (../shared/data).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd
from pymatgen.analysis.diffraction.xrd import XRDCalculator
from pymatgen.core import Structure

from cmma_cli.config import PreprocessConfig
from cmma_cli.preprocess.featurize import parse_structure
from cmma_cli.modalities.structure.graphs import build_graph
from cmma_cli.modalities.xrd.patterns import XRDGrid, computed_pattern

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mp20" / "mp20_sample.csv"


def load_structures(path: Path) -> tuple[pd.DataFrame, list[Structure]]:
    table = pd.read_csv(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return table, [Structure.from_str(cif, fmt="cif") for cif in table["cif"]]


def best_rate(runs: dict[str, callable], items: list, repeats: int) -> dict[str, float]:
    """Seconds per item of each callable over ``items``: best of ``repeats``, the callables interleaved."""
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            for item in items:
                fn(item)
            best[name] = min(best[name], (time.perf_counter() - start) / len(items))
    return best


def per_core(structures: list[Structure], cutoff: float, repeats: int) -> str:
    grid = XRDGrid()
    calculator = XRDCalculator(wavelength=grid.wavelength)
    pad = 3 * grid.fwhm
    texts = [s.to_json() for s in structures]
    graph = best_rate(
        {
            "floor": lambda s: s.get_neighbor_list(r=cutoff),
            "graph": lambda s: build_graph(s, cutoff=cutoff),
        },
        structures,
        repeats,
    )
    parsed = best_rate({"parse+graph": lambda t: build_graph(parse_structure(t), cutoff=cutoff)}, texts, repeats)
    xrd_repeats = max(2, repeats // 3)
    xrd = best_rate(
        {
            "floor": lambda s: calculator.get_pattern(
                s, scaled=False, two_theta_range=(grid.two_theta_min - pad, grid.two_theta_max + pad)
            ),
            "xrd": lambda s: computed_pattern(s, grid, calculator),
        },
        structures,
        xrd_repeats,
    )
    rows = [
        ("`Structure.get_neighbor_list` (floor)", graph["floor"], graph["floor"]),
        ("`build_graph` (cmma)", graph["graph"], graph["floor"]),
        ("structure JSON parse + `build_graph` (what a worker does)", parsed["parse+graph"], graph["floor"]),
        ("`XRDCalculator.get_pattern` (floor)", xrd["floor"], xrd["floor"]),
        ("`computed_pattern` (cmma: + broadening onto the grid)", xrd["xrd"], xrd["floor"]),
    ]
    lines = [
        (
            f"Per core, {len(structures)} MP-20 structures, cutoff {cutoff} A, XRD grid {grid.size} points "
            f"(best of {repeats} runs for graphs, {xrd_repeats} for XRD):"
        ),
        "",
        "| step | structures/s | us/structure | vs its floor |",
        "|---|---:|---:|---:|",
    ]
    for label, seconds, floor in rows:
        lines.append(f"| {label} | {1 / seconds:,.0f} | {seconds * 1e6:,.0f} | {seconds / floor:.2f}x |")
    return "\n".join(lines)


def linearity(structures: list[Structure], cutoff: float, repeats: int) -> str:
    lines = ["Graph building, linear in the number of materials (the sample repeated):", "",
             "| materials | seconds | us/structure |", "|---:|---:|---:|"]  # fmt: skip
    for times in (1, 2, 4):
        items = structures * times
        rate = best_rate({"graph": lambda s: build_graph(s, cutoff=cutoff)}, items, max(2, repeats // times))
        seconds = rate["graph"]
        lines.append(f"| {len(items):,} | {seconds * len(items):.2f} | {seconds * 1e6:,.0f} |")
    return "\n".join(lines)


def make_raw(table: pd.DataFrame, structures: list[Structure], scale: int, root: Path) -> Path:
    """A finished fetch stage with the sample ``scale`` times over (ids suffixed ``-copyN``)."""
    from cmma_cli.sources.schema import conform_descriptions, conform_materials, empty_synthesis, rejects_frame
    from cmma_cli.sources.structures import material_record
    from cmma_cli.workspace import Workspace, begin_stage, write_manifest, write_table

    cache = root / "base.parquet"
    if not cache.exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = [
                material_record(mid, s, "local:mp20", band_gap=gap, formation_energy_per_atom=ef, spacegroup_number=int(sg))
                for mid, s, gap, ef, sg in zip(table["material_id"], structures, table["band_gap"],
                                               table["formation_energy_per_atom"], table["spacegroup.number"])
            ]  # fmt: skip
        conform_materials(pd.DataFrame(rows))[0].to_parquet(cache)
    base = pd.read_parquet(cache)
    copies = [base.assign(material_id=base["material_id"] + (f"-copy{k}" if k else "")) for k in range(scale)]
    ws = Workspace(root / f"x{scale}")
    begin_stage(ws.raw)
    write_table(pd.concat(copies, ignore_index=True), ws.raw / "materials.parquet")
    write_table(empty_synthesis(), ws.raw / "synthesis.parquet")
    write_table(conform_descriptions(pd.DataFrame()), ws.raw / "descriptions.parquet")
    write_table(rejects_frame([]), ws.raw / "rejects.parquet")
    write_manifest(ws.raw, "fetch", {"source": "benchmark", "scale": scale}, rows={"materials": len(base) * scale})
    return ws.root


def _descendants_peak_rss(root_pid: int) -> float:
    """Largest peak RSS (MB, Linux ``VmHWM``) among the live descendants of ``root_pid``; 0 elsewhere."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    peak = 0.0
    for pid in parents:
        ancestor = parents.get(pid)
        while ancestor and ancestor != root_pid:
            ancestor = parents.get(ancestor)
        if ancestor != root_pid:
            continue
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) / 1024)
        except OSError:
            continue
    return peak


def stage_child(root: str, workers: int, xrd: bool) -> None:
    """Run the stage once in this (fresh) process and print seconds and peak memory as JSON.

    Workers are children of a fork server, not of this process, so their peak RSS is sampled from
    ``/proc`` while the stage runs.
    """
    import threading

    from cmma_cli.console import console
    from cmma_cli.preprocess import run_preprocess
    from cmma_cli.workspace import Workspace

    console.quiet = True
    worker_peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            worker_peak[0] = max(worker_peak[0], _descendants_peak_rss(os.getpid()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    manifest = run_preprocess(Workspace(Path(root)), PreprocessConfig(workers=workers, xrd=xrd), force=True)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"seconds": seconds, "materials": manifest["rows"]["materials"], "rss_main_mb": own}
    print(json.dumps({**result, "rss_worker_mb": worker_peak[0]}))


def stage(table, structures, scales: list[int], workers_all: int, xrd: bool) -> str:
    what = "graphs + XRD" if xrd else "graphs only (--no-xrd)"
    lines = [
        f"The whole stage (`run_preprocess`: read raw, {what}, texts, splits, write), fresh process per run:",
        "",
        "| materials | workers | seconds | materials/s | peak RSS main (MB) | peak RSS per worker (MB) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for scale in scales:
            root = make_raw(table, structures, scale, Path(tmp))
            for workers in sorted({1, workers_all}):
                out = subprocess.run(
                    [sys.executable, __file__, "--stage-child", str(root), str(workers), str(int(xrd))],
                    check=True, capture_output=True, text=True,
                )  # fmt: skip
                r = json.loads(out.stdout.strip().splitlines()[-1])
                worker_rss = f"{r['rss_worker_mb']:,.0f}" if workers > 1 else "-"
                lines.append(
                    f"| {r['materials']:,} | {workers} | {r['seconds']:.1f} | {r['materials'] / r['seconds']:,.0f} | "
                    f"{r['rss_main_mb']:,.0f} | {worker_rss} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MP-20 style CSV with a cif column")
    parser.add_argument("--cutoff", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scales", default="1,4", help="stage runs on the sample this many times over")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="the 'all cores' worker count")
    parser.add_argument("--skip-stage", action="store_true", help="only the per-core and linearity parts")
    parser.add_argument("--stage-only", action="store_true", help="only the whole-stage part")
    parser.add_argument("--no-xrd", action="store_true", help="run the stage without XRD (graphs only)")
    parser.add_argument("--stage-child", nargs=3, metavar=("ROOT", "WORKERS", "XRD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage_child:
        stage_child(args.stage_child[0], int(args.stage_child[1]), args.stage_child[2] == "1")
        return
    if not args.data.exists():
        sys.exit(f"{args.data} is missing: the benchmark needs the real data beside the repository (../shared/data).")
    table, structures = load_structures(args.data)
    load = os.getloadavg()[0]
    print(f"# cmma preprocess benchmark: {os.cpu_count()} cores, load average {load:.1f} at the start\n")
    if not args.stage_only:
        print(per_core(structures, args.cutoff, args.repeats) + "\n")
        print(linearity(structures, args.cutoff, args.repeats) + "\n")
    if not args.skip_stage:
        scales = [int(s) for s in args.scales.split(",")]
        print(stage(table, structures, scales, args.workers, not args.no_xrd) + "\n")


if __name__ == "__main__":
    main()
