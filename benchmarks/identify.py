"""Phase identification on real measured patterns: plain cosine vs the learned recall vs ``cmma identify``.

    .venv/bin/python benchmarks/identify.py                 # build the workspace, train both runs, print the tables
    .venv/bin/python benchmarks/identify.py --epochs 60 --ws data/bench/identify

The data (../shared/data): 8 MEASURED Cu Kα patterns of Li–Mn–Ti–O–F samples (5 single-phase, 3 mixtures) and
their 56 reference CIFs (XRD-AutoAnalyzer's example, polymorphs included), with the MP-20 sample (1,130 MP
structures) and cmma's built-in sample (298 structures) added as distractors: ~1,480 candidates, fetched into
one workspace and preprocessed. Two runs are trained on it (structure + xrd, the XRD encoder with the realistic
augmentation and without any; each keeps its epoch of best validation recall), then embedded.

For each pattern and each true phase (scored by formula, the polymorph chosen is reported), the rank of the
first candidate with that formula under

- (a) **cosine**: plain cosine of the background-removed pattern with every candidate's computed pattern;
- (b) **learned**: the pattern through a run's XRD encoder against every structure embedding (both runs);
- (c) **identify**: ``cmma identify`` (recall from both, physics re-rank, mixture decomposition), without and
  with the chemical space given (``--elements Li,Mn,Ti,O,F``): for a single phase its rank after the re-rank;
  for a mixture, the phase number at which it was found (``-``: not found), and the phases reported.

Then the speed: one pattern against 10,000 candidates (the workspace's repeated) on one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cmma_cli.config import IdentifyConfig  # noqa: E402
from cmma_cli.evaluate.report import md_table  # noqa: E402
from cmma_cli.workspace import Workspace  # noqa: E402

DATA = REPO.parent / "shared" / "data"
MEASURED = DATA / "xrd_measured" / "xrd_autoanalyzer"
ELEMENTS = "Li,Mn,Ti,O,F"
CMMA = [sys.executable, "-m", "cmma_cli"]
#: The two runs trained on the workspace: the XRD encoder with the realistic augmentation, and without any.
RUNS = {"augmented": "--xrd-augment", "plain": "--no-xrd-augment"}
#: Each run keeps the epoch whose validation recall is best (the recall is what identify uses).
TRAIN = ["--modalities", "structure,xrd", "--best-metric", "val_r1"]


def sh(*args: str) -> None:
    print("$ cmma " + " ".join(args), flush=True)
    subprocess.run([*CMMA, *args], check=True, cwd=REPO)


def build(ws: Path, epochs: int) -> None:
    """Fetch MP-20 + the built-in sample + the references into one workspace, preprocess, train, embed."""
    if not (ws / "raw" / "manifest.json").is_file():
        from pymatgen.core import Structure

        sample = pd.read_parquet(REPO / "cmma_cli" / "data" / "sample_materials.parquet")
        table = pd.DataFrame({"material_id": sample["material_id"],
                              "cif": [Structure.from_str(s, fmt="json").to(fmt="cif") for s in sample["structure"]]})
        ws.mkdir(parents=True, exist_ok=True)
        table.to_csv(ws / "sample.csv", index=False)
        sh("fetch", "-w", str(ws), "--source", "local", str(DATA / "mp20" / "mp20_sample.csv"), str(ws / "sample.csv"),
           str(MEASURED / "References"))
    sh("preprocess", "-w", str(ws))
    for run, augment in RUNS.items():
        if not (ws / "embeddings" / run / "manifest.json").is_file():
            sh("train", "-w", str(ws), "--run", run, *TRAIN, "--epochs", str(epochs), augment)
            sh("embed", "-w", str(ws), "--run", run)


def truth(path: Path) -> list[str]:
    from pymatgen.core import Composition

    return [Composition(f).reduced_formula for f in path.stem.split("+")]


def first_rank(order: np.ndarray, formulas: list[str], formula: str) -> int | None:
    for rank, row in enumerate(order, start=1):
        if formulas[row] == formula:
            return rank
    return None


def recall_ranks(ws: Workspace, patterns: list[Path], runs: list[str]) -> list[dict]:
    """Ranks of every true phase by plain cosine and by each run's learned recall (into the embedded computed
    patterns, and across into the structures), on the whole pattern."""
    from cmma_cli.identify.pipeline import Identifier
    from cmma_cli.identify.recall import LearnedRecall, order
    from cmma_cli.modalities.xrd.fit import observe
    from cmma_cli.modalities.xrd.readers import read_pattern

    merged: dict[tuple, dict] = {}
    for run in runs:
        ident = Identifier(ws, IdentifyConfig(run=run, recall="both"))
        across = LearnedRecall(ws, run, ident.candidates, table="structure")
        for path in patterns:
            m = read_pattern(path, "CuKa")
            observed = observe(m.two_theta, m.intensity, m.wavelength)
            found = ident.rankings(observed, observed.intensity)
            found["structure"] = order(across.scores(ident.on_grid(observed, observed.intensity)), ident.allowed)
            for formula in truth(path):
                row = merged.setdefault((path.stem, formula), {"pattern": path.stem, "phase": formula})
                row["(a) cosine"] = first_rank(found["cosine"], ident.candidates.formulas, formula)
                row[f"(b) learned, {run}"] = first_rank(found["learned"], ident.candidates.formulas, formula)
                row[f"(b') learned into structures, {run}"] = first_rank(found["structure"], ident.candidates.formulas,
                                                                        formula)
    return list(merged.values())


def identify_ranks(ws: Workspace, patterns: list[Path], elements: str | None) -> tuple[list[dict], float]:
    from cmma_cli.identify.pipeline import Identifier

    cfg = IdentifyConfig(run="augmented", recall="both", elements=[elements] if elements else [], k=100)
    ident = Identifier(ws, cfg)
    out, seconds = [], []
    for path in patterns:
        result = ident.identify(path)
        seconds.append(result.seconds)
        reported = [p["formula"] for p in result.phases]
        for formula in truth(path):
            if len(truth(path)) == 1:
                ranked = [r["formula"] for r in result.steps[0]] if result.steps else []
                where = ranked.index(formula) + 1 if formula in ranked else None
            else:
                where = reported.index(formula) + 1 if formula in reported else None
            out.append({"pattern": path.stem, "phase": formula, "identify": where,
                        "reported": " + ".join(f"{p['material_id']} ({p['weight_fraction']:.0%})"
                                               if p["weight_fraction"] is not None else p["material_id"]
                                               for p in result.phases)})
    return out, float(np.median(seconds))


def speed(ws: Workspace, pattern: Path, n: int = 10_000) -> dict:
    """One pattern against ``n`` candidates (the workspace's repeated), one thread, after loading."""
    import torch

    from cmma_cli.identify.candidates import Candidates
    from cmma_cli.identify.pipeline import Identifier

    torch.set_num_threads(1)
    ident = Identifier(ws, IdentifyConfig(run="augmented", recall="both", max_phases=1))
    c = ident.candidates
    reps = -(-n // len(c))
    take = np.tile(np.arange(len(c)), reps)[:n]
    # the same materials repeated (same ids), so the learned recall and the structures resolve
    big = Candidates([c.ids[i] for i in take], [c.formulas[i] for i in take], [c.elements[i] for i in take],
                     [c.spacegroups[i] for i in take], [c.sources[i] for i in take], c.patterns[take], c.grid,
                     structure_text={}, workspace=ws)
    ident.candidates = big
    ident.allowed = np.ones(n, dtype=bool)
    ident.always = []
    from cmma_cli.identify.recall import LearnedRecall

    ident.learned = LearnedRecall(ws, "augmented", big)
    ident.identify(pattern)  # warm: structures parsed, reflections cached as a loaded index would hold them
    best = min(ident.identify(pattern).seconds for _ in range(3))
    ident.candidates._reflections.clear()
    cold = ident.identify(pattern).seconds
    return {"candidates": n, "recall + re-rank (s), reflections cached": round(best, 2),
            "same, reflections computed": round(cold, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ws", type=Path, default=REPO / "data" / "bench" / "identify")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "identify.md")
    args = parser.parse_args()
    if not MEASURED.is_dir():
        sys.exit(f"The measured patterns are not in {MEASURED}: this benchmark needs ../shared/data.")
    build(args.ws, args.epochs)
    ws = Workspace(args.ws)
    patterns = sorted((MEASURED / "Spectra").glob("*.xy"))
    recalls = recall_ranks(ws, patterns, RUNS)
    plain, t_plain = identify_ranks(ws, patterns, None)
    constrained, t_constrained = identify_ranks(ws, patterns, ELEMENTS)
    table = []
    for rec, a, b in zip(recalls, plain, constrained):
        table.append({**rec, "(c) identify": a["identify"], f"(c) identify --elements {ELEMENTS}": b["identify"],
                      "reported (no elements)": a["reported"], "reported (elements)": b["reported"]})
    frame = pd.DataFrame(table)
    lines = [f"# Phase identification on measured patterns ({len(patterns)} patterns, {candidate_count(ws)} "
             "candidates)", "",
             f"Reproduce: `.venv/bin/python benchmarks/identify.py --epochs {args.epochs}`", "",
             frame_md(frame.fillna("-")), "",
             f"Median time per pattern (all phases, this machine's shared cores): {t_plain:.2f} s without elements, "
             f"{t_constrained:.2f} s with them.", ""]
    summary = summarise(frame)
    lines += [frame_md(pd.DataFrame(summary)), ""]
    fast = speed(ws, MEASURED / "Spectra" / "MnO.xy")
    lines += ["Speed, one pattern, one CPU thread, one phase:", "", frame_md(pd.DataFrame([fast])), ""]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    (args.out.with_suffix(".json")).write_text(json.dumps({"rows": table, "summary": summary, "speed": fast}, indent=2,
                                                          default=str))


def frame_md(frame: pd.DataFrame) -> str:
    return md_table([str(c) for c in frame.columns], frame.values.tolist())


def candidate_count(ws: Workspace) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(ws.processed / "materials.parquet").metadata.num_rows


def summarise(frame: pd.DataFrame) -> list[dict]:
    single = frame[~frame["pattern"].str.contains(r"\+")]
    mixed = frame[frame["pattern"].str.contains(r"\+")]
    out = []
    for column in [c for c in frame.columns if c.startswith(("(a)", "(b", "(c)"))]:
        ranks = single[column]
        out.append({"method": column,
                    "single-phase at rank 1": f"{int((ranks == 1).sum())}/{len(single)}",
                    "single-phase median rank": float(pd.to_numeric(ranks, errors="coerce").median()),
                    "mixture phases": (f"{int(mixed[column].notna().sum())}/{len(mixed)} found"
                                       if column.startswith("(c)") else
                                       f"{int((pd.to_numeric(mixed[column], errors='coerce') <= 10).sum())}/{len(mixed)} in top 10")})
    return out


if __name__ == "__main__":
    main()
