"""Evidence for the composition hub: does synthesis <-> structure alignment emerge through composition?

    .venv/bin/python benchmarks/hub.py -w data/bench/hub --epochs 20

The workspace: the MP-20 sample (1,130 structures) fetched with every text-mined recipe (solid-state and sol-gel,
39,549), so that ``cmma preprocess`` keeps each recipe as a row of its own (``processed/recipes.parquet``). Runs, same
seed and epochs, each trained, embedded and scored here:

- ``pairs-all``: structure, text and XRD, every pair, no recipe rows: recipes train only through the few materials
  whose formula they share (what cmma did before the hub);
- ``hub``: structure, composition, text and XRD aligned to composition only (``--pairs anchor:composition``), with
  every recipe row, element vectors started from the shipped mat2vec embeddings: no recipe text is ever paired
  with a structure in training;
- ``hub-no-recipes``: the hub (default, random element vectors) without recipe rows (what the recipes add);
- ``hub-random-init``: the hub with element vectors started at random (the default) instead of the shipped mat2vec
  ones.

Scores: synthesis match (:func:`cmma_cli.evaluate.synthesis.synthesis_match`), the ROC AUC of each recipe linked to
a material (its text embedding) against the material's structure embedding, true pairs against every mismatched
pair (random) and against mismatched pairs that share an element (hard); on the test split, and on every material
with a recipe (for the hub runs none of these pairs was trained). Beside them, the simple tool: the cosine of the
recipe target's and the material's element-fraction vectors (a formula match). Writes
``benchmarks/results/hub.md`` and ``hub.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cmma_cli.composition import ELEMENTS, composition_vectors  # noqa: E402
from cmma_cli.evaluate.data import load_eval_data  # noqa: E402
from cmma_cli.evaluate.synthesis import match_scores, recipe_pairs, synthesis_match  # noqa: E402
from cmma_cli.workspace import Workspace  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SOURCES = [DATA / "mp20" / "mp20_sample.csv", DATA / "synthesis" / "solid-state_dataset_2019-12-03.json.xz",
           DATA / "synthesis" / "sol-gel_dataset_20200713.json.xz"]
RUNS = {
    "pairs-all": ["--modalities", "structure,text,xrd", "--pairs", "all", "--no-recipes"],
    "hub": ["--modalities", "structure,composition,text,xrd", "--pairs", "anchor:composition",
            "--composition-init", "matscholar"],
    "hub-no-recipes": ["--modalities", "structure,composition,text,xrd", "--pairs", "anchor:composition",
                       "--no-recipes"],
    "hub-random-init": ["--modalities", "structure,composition,text,xrd", "--pairs", "anchor:composition",
                        "--composition-init", "random"],
}
CMMA = [sys.executable, "-m", "cmma_cli"]


def cmma(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run([*CMMA, *args], check=True)
    return time.perf_counter() - started


def fraction_rows(table, ids) -> np.ndarray:
    """Element-fraction vectors of ``ids`` from a processed table's composition columns."""
    frame = table.set_index("material_id")
    out = np.zeros((len(ids), len(ELEMENTS)), dtype=np.float32)
    for i, mid in enumerate(ids):
        els, frs = frame.at[mid, "composition_elements"], frame.at[mid, "composition_fractions"]
        if els is not None:
            out[i, np.asarray(els, dtype=int)] = frs
    return out


def formula_baseline(ws: Workspace, data, split: str) -> dict | None:
    """The simple tool: cosine of element-fraction vectors, recipe target vs material."""
    import pyarrow.parquet as pq

    cols = ["material_id", "composition_elements", "composition_fractions"]
    materials = pq.read_table(ws.processed / "materials.parquet", columns=cols).to_pandas()
    recipes = pq.read_table(ws.processed / "recipes.parquet", columns=cols).to_pandas()
    ids = np.array([m for m in data.split_ids(split) if m in set(materials["material_id"])], dtype=object)
    pairs = recipe_pairs(data, ids)
    if pairs is None:
        return None
    names, true, hard = pairs
    R = composition_vectors(fraction_rows(recipes, names))
    X = composition_vectors(fraction_rows(materials, ids))
    return match_scores(R @ X.T, true, hard)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-w", "--workspace", default="data/bench/hub")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--runs", default=",".join(RUNS), help="the runs to (re)do; the others' saved results stay")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hub"))
    parser.add_argument("--report-only", action="store_true", help="rewrite hub.md from hub.json")
    args = parser.parse_args()
    ws = Workspace(Path(args.workspace))
    if args.report_only:
        report(ws, json.loads(Path(args.out).with_suffix(".json").read_text()), args, Path(args.out))
        return
    if not (ws.raw / "recipes.parquet").exists():
        cmma("fetch", "-w", str(ws.root), "--source", "local", *map(str, SOURCES))
    cmma("preprocess", "-w", str(ws.root))
    saved = Path(args.out).with_suffix(".json")
    results: dict[str, dict] = json.loads(saved.read_text()) if saved.exists() else {}  # runs not redone stay
    for run in args.runs.split(","):
        seconds = cmma("train", "-w", str(ws.root), "--run", run, *RUNS[run], "--epochs", str(args.epochs),
                       "--batch-size", str(args.batch_size), "--no-projector", "--force")
        cmma("embed", "-w", str(ws.root), "--run", run, "--force")
        data = load_eval_data(ws, run)
        results[run] = {"train_seconds": round(seconds, 1), "args": RUNS[run],
                        **{split: synthesis_match(data, "structure", split) for split in ("test", "all")}}
        if "formula match (element fractions)" not in results:  # the same for every run: computed once
            results["formula match (element fractions)"] = {split: formula_baseline(ws, data, split)
                                                            for split in ("test", "all")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    report(ws, results, args, out)


def report(ws: Workspace, results: dict[str, dict], args, out: Path) -> None:
    """``hub.md``: the table of ``results``."""
    manifest = json.loads((ws.processed / "manifest.json").read_text())
    nan = float("nan")
    lines = ["# Composition hub: emergent synthesis <-> structure alignment", "",
             f"Workspace: MP-20 sample ({manifest['rows']['materials']} structures) + {manifest['rows']['recipes']:,} "
             "text-mined recipe rows (solid-state + sol-gel). "
             f"{args.epochs} epochs, batch {args.batch_size}, seed 0, CPU. Reproduce: "
             f"`.venv/bin/python benchmarks/hub.py -w {args.workspace} --epochs {args.epochs}`.", "",
             "Synthesis match: ROC AUC of recipe (text embedding) vs material (structure embedding), true pairs against "
             "every mismatched pair (random) and against mismatched pairs sharing an element; recipe -> material R@1 "
             "among the split's materials. The formula match scores the recipe target's element fractions against the "
             "material's.", "",
             "| method | test: recipes / materials | test AUC random | test AUC element-sharing | test R@1 | "
             "all: recipes / materials | all AUC random | all AUC element-sharing | all R@1 |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for name, r in results.items():
        t, a = r.get("test") or {}, r.get("all") or {}
        lines.append(
            f"| {name} | {t.get('recipes', '-')} / {t.get('materials', '-')} | {t.get('auc_random', nan):.3f} | "
            f"{t.get('auc_hard', nan):.3f} | {t.get('recipe_to_material_recall@1', nan):.3f} | "
            f"{a.get('recipes', '-')} / {a.get('materials', '-')} | {a.get('auc_random', nan):.3f} | "
            f"{a.get('auc_hard', nan):.3f} | {a.get('recipe_to_material_recall@1', nan):.3f} |")
    chance = (results.get("hub", {}).get("all") or {}).get("chance_recall@1")
    if chance is not None:
        lines += ["", f"R@1 by chance: {chance:.4f} (all)."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
