"""Benchmark the fast XRD simulator against pymatgen's XRDCalculator: speed per core and agreement of the sticks.

    .venv/bin/python benchmarks/xrd.py                  # the whole MP-20 sample (../shared/data/mp20/mp20_sample.csv)
    .venv/bin/python benchmarks/xrd.py --limit 200      # the first 200 structures
    .venv/bin/python benchmarks/xrd.py --wavelength MoKa --two-theta 5,60

1. Per core (one thread for numpy's BLAS and OpenMP; CPU time of the process): structures/s of
   ``XRDCalculator(wavelength).get_pattern(s, scaled=False, two_theta_range=...)`` and of
   :func:`cmma_cli.modalities.xrd.simulate.stick_pattern` on the same parsed structures in the same run, each
   timed ``--repeats`` times, interleaved, best run kept; also ``reflections`` alone (the wavelength-free
   part) and ``computed_pattern`` (fast sticks + broadening onto the default grid).
2. Agreement: per structure, every peak above 1 % of the strongest (both scaled to max 100) of either must
   have a partner in the other within 0.01 degrees and 1 percentage point. Reported: the fraction of
   structures that agree, the worst position and intensity error over the peaks above 1 %, and how many
   structures have pymatgen's stick list exactly (same count, positions within 1e-9 degrees, intensities
   within 1e-9 relative) and to pymatgen's own merge tolerance (positions within its 1e-5 degree bins: a
   merged peak may sit at an extinct reflection in pymatgen, which the fast path leaves out).

Prints Markdown tables on stdout. Needs the real data beside the repository (../shared/data).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # one core: set before numpy is imported

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from pymatgen.analysis.diffraction.xrd import XRDCalculator  # noqa: E402
from pymatgen.core import Structure  # noqa: E402

from cmma_cli.modalities.xrd.patterns import XRDGrid, computed_pattern  # noqa: E402
from cmma_cli.modalities.xrd.simulate import (  # noqa: E402
    TWO_THETA_TOL,
    reflections,
    stick_pattern,
    wavelength_angstrom,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mp20" / "mp20_sample.csv"
POSITION_TOL, INTENSITY_TOL, SHOWN = 0.01, 1.0, 1.0  # degrees, percentage points, % of the strongest peak


def load_structures(path: Path, limit: int | None) -> list[Structure]:
    table = pd.read_csv(path)
    if limit:
        table = table.head(limit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [Structure.from_str(cif, fmt="cif") for cif in table["cif"]]


def best_rate(runs: dict[str, callable], items: list, repeats: int) -> dict[str, float]:
    """CPU seconds per item of each callable over ``items``: best of ``repeats``, the callables interleaved.

    CPU time of this (single-threaded) process, not wall time: other load on a shared machine does not count.
    """
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.process_time()
            for item in items:
                fn(item)
            best[name] = min(best[name], (time.process_time() - start) / len(items))
    return best


def same_sticks(reference: tuple, fast: tuple, position_tol: float) -> bool:
    (rx, ry), (fx, fy) = reference, fast
    return (len(rx) == len(fx) and np.allclose(rx, fx, rtol=0, atol=position_tol)
            and np.allclose(ry, fy, rtol=1e-9, atol=0))  # fmt: skip


def compare(reference: tuple, fast: tuple) -> tuple[bool, float, float]:
    """(agree, worst position error, worst intensity error) of two stick patterns, peaks above SHOWN %."""
    (rx, ry), (fx, fy) = (np.asarray(a, dtype=float) for a in reference), (np.asarray(a, dtype=float) for a in fast)
    ry, fy = 100 * ry / ry.max(), 100 * fy / fy.max()
    agree, worst_x, worst_y = True, 0.0, 0.0
    for ax, ay, bx, by in ((rx, ry, fx, fy), (fx, fy, rx, ry)):
        for x, y in zip(ax[ay > SHOWN], ay[ay > SHOWN]):
            j = int(np.argmin(np.abs(bx - x)))
            near = np.abs(bx - x) <= POSITION_TOL
            dy = float(np.abs(by[near] - y).min()) if near.any() else float("inf")
            worst_x, worst_y = max(worst_x, abs(bx[j] - x)), max(worst_y, dy if near.any() else abs(by[j] - y))
            agree &= dy <= INTENSITY_TOL
    return agree, worst_x, worst_y


def safe(fn, structure):
    try:
        return fn(structure)
    except ValueError as exc:  # no scattering factors for an element
        return exc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MP-20 style CSV with a cif column")
    parser.add_argument("--limit", type=int, default=None, help="only the first N structures")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wavelength", default="CuKa", help="a pymatgen name or angstrom")
    parser.add_argument("--two-theta", default="9.4,90.6",
                        help="2-theta range (degrees); the default is cmma's grid padded by 3 FWHM")  # fmt: skip
    args = parser.parse_args()
    if not args.data.exists():
        sys.exit(f"{args.data} is missing: the benchmark needs the real data beside the repository (../shared/data).")
    lo, hi = (float(v) for v in args.two_theta.split(","))
    wavelength = args.wavelength if args.wavelength in XRDCalculator.AVAILABLE_RADIATION else float(args.wavelength)
    lam = wavelength_angstrom(wavelength)
    structures = load_structures(args.data, args.limit)
    calculator = XRDCalculator(wavelength=wavelength)
    grid = XRDGrid()

    def pmg(s):
        pattern = calculator.get_pattern(s, scaled=False, two_theta_range=(lo, hi))
        return np.asarray(pattern.x), np.asarray(pattern.y)

    def fast(s):
        return stick_pattern(s, lam, (lo, hi))

    d_min = lam / (2 * np.sin(np.radians(hi / 2)))
    pmg_out = [safe(pmg, s) for s in structures]
    fast_out = [safe(fast, s) for s in structures]
    usable = [s for s, r in zip(structures, pmg_out) if not isinstance(r, Exception)]
    rates = best_rate(
        {
            "pymatgen": pmg,
            "fast": fast,
            "reflections": lambda s: reflections(s, d_min),
            "computed_pattern": lambda s: computed_pattern(s, grid),
        },
        usable,
        args.repeats,
    )

    print(f"# XRD simulation: {len(structures)} MP-20 structures, {args.wavelength} ({lam:g} A), "
          f"2-theta {lo:g}-{hi:g} deg, one core, load average {os.getloadavg()[0]:.1f} at the start\n")  # fmt: skip
    print("Command: `" + " ".join([".venv/bin/python", "benchmarks/xrd.py", *sys.argv[1:]]) + "`")
    print(f"\nPer core (CPU time), best of {args.repeats} interleaved runs over the {len(usable)} structures "
          "pymatgen computes:\n")  # fmt: skip
    print("| path | structures/s | us/structure | speed-up vs pymatgen |")
    print("|---|---:|---:|---:|")
    rows = [
        ("`XRDCalculator.get_pattern(scaled=False)` (pymatgen)", "pymatgen"),
        ("`simulate.stick_pattern` (fast; same sticks)", "fast"),
        ("`simulate.reflections` alone (wavelength-free d, \\|F\\|^2)", "reflections"),
        ("`computed_pattern` (fast sticks + broadening onto the 1601-point grid)", "computed_pattern"),
    ]
    for label, key in rows:
        seconds = rates[key]
        print(f"| {label} | {1 / seconds:,.0f} | {seconds * 1e6:,.0f} | {rates['pymatgen'] / seconds:.1f}x |")

    agree = identical = within_bin = both_rejected = 0
    worst_x = worst_y = 0.0
    disagreeing = []
    for s, ref, out in zip(structures, pmg_out, fast_out):
        if isinstance(ref, Exception) or isinstance(out, Exception):
            both_rejected += isinstance(ref, Exception) and isinstance(out, Exception)
            if not (isinstance(ref, Exception) and isinstance(out, Exception)):
                disagreeing.append(f"{s.composition.reduced_formula} (rejected by one only)")
            continue
        ok, dx, dy = compare(ref, out)
        agree += ok
        identical += same_sticks(ref, out, 1e-9)
        within_bin += same_sticks(ref, out, TWO_THETA_TOL)
        worst_x, worst_y = max(worst_x, dx), max(worst_y, dy)
        if not ok:
            disagreeing.append(s.composition.reduced_formula)
    n = len(structures) - both_rejected
    print(f"\nAgreement (peaks above {SHOWN:g} % of the strongest, both ways, within {POSITION_TOL} deg "
          f"and {INTENSITY_TOL:g} percentage point):\n")  # fmt: skip
    print("| structures compared | agree | worst position error (deg) | worst intensity error (points of 100) "
          "| all sticks, positions to 1e-9 deg | all sticks, positions to 1e-5 deg | rejected by both |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {n} | {agree} ({100 * agree / max(n, 1):.1f} %) | {worst_x:.2e} | {worst_y:.2e} | "
          f"{identical} ({100 * identical / max(n, 1):.1f} %) | {within_bin} ({100 * within_bin / max(n, 1):.1f} %) "
          f"| {both_rejected} |")  # fmt: skip
    if disagreeing:
        print(f"\nDisagreeing: {', '.join(disagreeing[:20])}")


if __name__ == "__main__":
    main()
