"""The whole pipeline on the real data beside the repository, ending in the tables the README shows.

    .venv/bin/python benchmarks/evaluate_shared.py                       # MP-20 sample and Perov-5, CPU or GPU
    .venv/bin/python benchmarks/evaluate_shared.py --datasets mp20 -w data/bench --epochs 30
    .venv/bin/python benchmarks/evaluate_shared.py --encoders schnet,chgnet   # structure encoders side by side

For each dataset: ``cmma fetch --source local`` (the structures table and the text-mined solid-state
recipes, linked by formula and mp_id), ``cmma preprocess``, ``cmma train`` (the config below),
``cmma embed`` and ``cmma evaluate`` (every section), into ``<workspace>/<dataset>/``. Then it prints
Markdown: split sizes, the property table (CMMA probes beside the supervised single-modality and
fusion baselines), classification, retrieval and synthesis match next to chance, and writes the same
to ``<workspace>/<dataset>/tables.md``. With several ``--encoders``, each structure encoder trains its own
run (``bench-<encoder>``) on the same split, and a comparison table puts their probes, their supervised
baselines and their retrieval side by side (``<workspace>/<dataset>/encoders.md``). The real data must sit beside the repository (../shared/data).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cmma_cli.config import EmbedConfig, EvaluateConfig, FetchConfig, PreprocessConfig, TrainConfig, from_dict  # noqa: E402
from cmma_cli.embed import run_embed  # noqa: E402
from cmma_cli.evaluate.pipeline import run_evaluate  # noqa: E402
from cmma_cli.evaluate.report import fmt, md_table, target_rows, verdict_rows  # noqa: E402
from cmma_cli.fetch import run_fetch  # noqa: E402
from cmma_cli.preprocess.pipeline import run_preprocess  # noqa: E402
from cmma_cli.train import run_train  # noqa: E402
from cmma_cli.workspace import Workspace, read_manifest  # noqa: E402

DATA = REPO.parent / "shared" / "data"
RECIPES = DATA / "synthesis" / "solid-state_dataset_2019-12-03.json.xz"
DATASETS = {
    "mp20": {"table": DATA / "mp20" / "mp20_sample.csv", "modalities": ["structure", "text", "xrd"],
             "baseline_properties": ["formation_energy_per_atom", "band_gap"], "baseline_tasks": ["metal"]},
    "perov5": {"table": DATA / "perov5" / "perov5_val.csv", "modalities": ["structure", "xrd"],
               "baseline_properties": ["heat_all", "dir_gap"], "baseline_tasks": ["crystal_system"],
               "compare": ["heat_all", "heat_ref", "dir_gap"]},
}


def train_config(modalities: list[str], epochs: int, encoder: str = "schnet") -> TrainConfig:
    """The benchmark's model at a width a 2-core CPU trains in minutes (a pretrained backbone: frozen, its
    defaults; a from-scratch GNN: 64 wide, 3 layers)."""
    return TrainConfig(modalities=modalities, epochs=epochs, batch_size=128, lr=2e-3, embed_dim=128, proj_hidden=256,
                       structure_encoder=encoder, structure_hidden=64, structure_layers=3, num_rbf=32,
                       xrd_channels=16, xrd_out_dim=128, seed=0)


def tables(metrics: dict, name: str, seconds: dict[str, float]) -> str:
    """The README's Markdown for one dataset."""
    run = metrics["run"]
    out = [f"### {name}", ""]
    splits = run["splits"]
    out.append(md_table(["split", "materials", *run["modalities"]],
                        [[s, splits[s]["materials"], *(splits[s].get(m, 0) for m in run["modalities"])]
                         for s in ("train", "val", "test")]))
    out += ["", f"Reproduce: `.venv/bin/python benchmarks/evaluate_shared.py --datasets {name}` (report: "
            f"`{run['command']}`). Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + ".", ""]
    for prop in metrics.get("probes", {}).get("regression", {}):
        out += [f"**{prop}** (test split)", "", md_table(["model", "embedding / input", "MAE", "RMSE", "R²", "n test"],
                                                         target_rows(metrics, "regression", prop)), ""]
    for task in metrics.get("probes", {}).get("classification", {}):
        source = metrics["probes"]["label_sources"][task]
        out += [f"**{task}** ({source})", "", md_table(["model", "embedding", "accuracy", "macro F1", "ROC AUC", "n test"],
                                                       target_rows(metrics, "classification", task)), ""]
    for kind, metric in (("regression", "test MAE, lower is better"), ("classification", "test macro F1, higher is better")):
        rows = verdict_rows(metrics, kind)
        if rows:
            out += [f"**CMMA against the supervised baselines** ({metric}; verdict: CMMA MLP probe on the unified "
                    "embedding against intermediate fusion)", "",
                    md_table(["target", "dummy", "CMMA linear (unified)", "CMMA MLP (unified)", "best single-modality",
                              "intermediate fusion", "late fusion", "verdict"], rows), ""]
    pairs = metrics.get("retrieval", {}).get("pairs", {})
    if pairs:
        rows = [[p, s["queries"], f"{fmt(s['recall@1'])} ({fmt(s['chance_recall@1'])})",
                 f"{fmt(s['recall@10'])} ({fmt(s['chance_recall@10'])})", f"{fmt(s['mrr'])} ({fmt(s['chance_mrr'])})",
                 f"{fmt(s['map'])} ({fmt(s['chance_map'])})", f"{s['median_rank']:.0f} ({s['chance_median_rank']:.0f})"]
                for p, s in pairs.items()]
        out += ["**Retrieval** (test split; chance in brackets)", "",
                md_table(["query -> gallery", "n", "R@1", "R@10", "MRR", "mAP", "median rank"], rows), ""]
    synth = metrics.get("synthesis", {})
    if synth.get("by_modality"):
        rows = [[m, s["recipes"], s["true_pairs"], s["auc_random"], s["auc_hard"], s["hard_negatives"]]
                for m, s in synth["by_modality"].items()]
        out += ["**Synthesis match** (test split; ROC AUC, 0.5 is chance)", "",
                md_table(["material side", "recipes", "true pairs", "AUC random", "AUC hard", "hard negatives"], rows), ""]
    elif synth.get("note"):
        out += [f"Synthesis match: not scored ({synth['note']}).", ""]
    purity = metrics.get("latent", {}).get("purity", {})
    if purity:
        out += ["Crystal-system neighbourhood purity (test): " + ", ".join(
            f"{t} {fmt(s['purity'])} (chance {fmt(s['chance'])})" for t, s in purity.items()) + ".", ""]
    return "\n".join(out)


def run_dataset(root: Path, name: str, epochs: int, baseline_epochs: int, device: str,
                encoder: str = "schnet", run: str = "bench") -> tuple[str, dict]:
    spec = DATASETS[name]
    ws = Workspace(root / name)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    if read_manifest(ws.raw) is None:
        run_fetch(ws, FetchConfig(source="local", paths=[str(spec["table"]), str(RECIPES)]), api_key=None)
    seconds["fetch"] = time.perf_counter() - t
    t = time.perf_counter()
    run_preprocess(ws, PreprocessConfig())
    seconds["preprocess"] = time.perf_counter() - t
    cfg = train_config(spec["modalities"], epochs, encoder)
    t = time.perf_counter()
    manifest = read_manifest(ws.run_dir(run))
    # a run trained before a config field existed was trained with that field's default (from_dict fills it;
    # it also reads the flat layout of runs made before the modality sections)
    if manifest is None or from_dict(TrainConfig, manifest.get("config", {})) != cfg:
        run_train(ws, cfg, run=run, force=True)
    seconds["train"] = time.perf_counter() - t
    t = time.perf_counter()
    run_embed(ws, EmbedConfig(run=run, device=device))
    seconds["embed"] = time.perf_counter() - t
    t = time.perf_counter()
    metrics = run_evaluate(ws, EvaluateConfig(run=run, baseline_epochs=baseline_epochs, device=device,
                                              baseline_properties=spec["baseline_properties"],
                                              baseline_tasks=spec["baseline_tasks"]))
    seconds["evaluate"] = time.perf_counter() - t
    text = tables(metrics, name, seconds)
    (ws.root / f"tables-{run}.md").write_text(text + "\n")
    return text, metrics


def encoder_table(name: str, results: dict[str, dict]) -> str:
    """Structure encoders side by side on one dataset: probe and supervised MAE per property, retrieval R@1."""
    props = DATASETS[name].get("compare", DATASETS[name]["baseline_properties"])
    header = ["structure encoder", "model", *(f"{p} MAE" for p in props)]
    rows = []
    first = next(iter(results.values()))
    rows.append(["-", "dummy (train mean)", *(fmt(first["probes"]["regression"].get(p, {}).get("unified", {})
                                                      .get("dummy", {}).get("mae")) for p in props)])
    for encoder, m in results.items():
        probes, base = m["probes"]["regression"], m.get("baselines", {}).get("regression", {})
        for table in ("unified", "structure"):
            rows.append([encoder, f"CMMA ridge probe, {table} embedding",
                         *(fmt(probes.get(p, {}).get(table, {}).get("ridge", {}).get("mae")) for p in props)])
        rows.append([encoder, "supervised, structure encoder + MLP head",
                     *(fmt(base.get(p, {}).get("structure", {}).get("mae")) for p in props)])
    out = [f"### {name}: structure encoders side by side (test split)", "", md_table(header, rows), ""]
    pairs = sorted({k for m in results.values() for k in m["retrieval"]["pairs"] if "structure" in k})
    out.append(md_table(["structure encoder", *(f"{k} R@1" for k in pairs)],
                        [[e, *(fmt(m["retrieval"]["pairs"].get(k, {}).get("recall@1")) for k in pairs)]
                         for e, m in results.items()]))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-w", "--workspace", type=Path, default=REPO / "data" / "bench")
    parser.add_argument("--datasets", default="mp20,perov5")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--baseline-epochs", type=int, default=15)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--encoders", default="schnet", help="structure encoders to compare, e.g. schnet,chgnet")
    args = parser.parse_args()
    if not RECIPES.exists():
        sys.exit(f"The real data is not at {DATA}: this benchmark needs ../shared/data beside the repository.")
    encoders = [e.strip() for e in args.encoders.split(",") if e.strip()]
    out = []
    for name in (n.strip() for n in args.datasets.split(",") if n.strip()):
        results = {}
        for encoder in encoders:
            run = "bench" if encoders == ["schnet"] else f"bench-{encoder}"
            text, results[encoder] = run_dataset(args.workspace, name, args.epochs, args.baseline_epochs, args.device,
                                                 encoder, run)
            out.append(text)
        if len(encoders) > 1:
            table = encoder_table(name, results)
            (args.workspace / name / "encoders.md").write_text(table + "\n")
            out.append(table)
    print("\n\n".join(out))


if __name__ == "__main__":
    main()
