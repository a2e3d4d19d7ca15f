"""Pretrained structure backbones: frozen feature extraction speed, and which parts of the material vector pay.

    .venv/bin/python benchmarks/backbone.py                        # MP-20 sample: speed table
    .venv/bin/python benchmarks/backbone.py --data perov5 --probes # Perov-5: speed, then the feature probes

Speed (one process, one torch thread, as ``cmma train`` extracts): structures/s of the frozen extraction per
backbone with a cold workspace cache (the package's graph construction + forward pass, no forces) and a warm one
(the cache read), beside the from-scratch SchNet forward pass (``build_graph`` + the default SchNet, no grad)
in the same run. ``--probes``: for every combination of the vector's parts (``layers``, ``crystal``, ``energy``,
``composition``; ``--structure-features``), ridge regression (standardised inputs, alpha by cross-validation)
trained on cmma's own grouped train+val split and scored on its test split, beside the train-mean dummy: what
picks the default. The real data must sit beside the repository (../shared/data).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cmma_cli.config import TrainConfig  # noqa: E402
from cmma_cli.console import console  # noqa: E402
from cmma_cli.evaluate.report import md_table  # noqa: E402
from cmma_cli.modalities.base import Context  # noqa: E402
from cmma_cli.modalities.structure import encoders  # noqa: E402
from cmma_cli.modalities.structure.encoders.backbone import FEATURES, cached_parts, composition  # noqa: E402
from cmma_cli.preprocess.splits import assign_splits  # noqa: E402

DATA = REPO.parent / "shared" / "data"
TABLES = {"mp20": (DATA / "mp20" / "mp20_sample.csv", "pretty_formula", ["formation_energy_per_atom", "band_gap"]),
          "perov5": (DATA / "perov5" / "perov5_val.csv", "formula", ["heat_ref", "heat_all"])}


def load(name: str, limit: int | None):
    """(frame, structures) of a real-data table."""
    from pymatgen.core import Structure

    path, formula, _ = TABLES[name]
    frame = pd.read_csv(path, nrows=limit)
    frame["material_id"] = frame["material_id"].astype(str)
    frame["formula"] = frame[formula]
    return frame, [Structure.from_str(c, fmt="cif") for c in frame["cif"]]


def arrays(structures):
    """The processed structure columns cmma keeps (numbers, offsets, lattices, fractional coordinates)."""
    z = np.concatenate([s.atomic_numbers for s in structures]).astype(np.int64)
    offsets = np.concatenate(([0], np.cumsum([len(s) for s in structures]))).astype(np.int64)
    lattice = np.stack([s.lattice.matrix.reshape(-1) for s in structures]).astype(np.float32)
    frac = np.concatenate([s.frac_coords for s in structures]).astype(np.float32)
    return z, offsets, lattice, frac


def backbone_parts(name: str, structures, cache: Path) -> tuple[dict, dict, float, float]:
    """(spec, parts, cold seconds, warm seconds) of one backbone's frozen extraction through cmma's cache."""
    cls = encoders.encoder_class(name)
    ctx = Context({}, cache_dir=cache, show_progress=False)
    spec = cls.make_spec(name, TrainConfig(structure_encoder=name).structure, ctx)
    z, offsets, lattice, frac = arrays(structures)
    rows = np.arange(len(structures))
    t = time.perf_counter()
    parts, ok = cached_parts(cls, spec, ctx, z, offsets, lattice, frac, rows)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    cached_parts(cls, spec, ctx, z, offsets, lattice, frac, rows)
    warm = time.perf_counter() - t
    parts = {p: v for p, v in parts.items()}
    parts["ok"] = ok
    return spec, parts, cold, warm


def schnet_seconds(structures) -> float:
    """Seconds for the default SchNet to embed ``structures`` from scratch (graphs included), no grad."""
    from cmma_cli.modalities.structure.encoders.schnet import SchNet
    from cmma_cli.modalities.structure.graphs import build_graph

    torch.manual_seed(0)
    model = SchNet().eval()
    t = time.perf_counter()
    for start in range(0, len(structures), 32):
        graphs = [build_graph(s) for s in structures[start:start + 32]]
        counts = [len(g.atomic_numbers) for g in graphs]
        shift = np.repeat(np.concatenate(([0], np.cumsum(counts)[:-1])), [len(g.edge_src) for g in graphs])
        inputs = {
            "z": torch.from_numpy(np.concatenate([g.atomic_numbers for g in graphs]).astype(np.int64)),
            "edge_index": torch.from_numpy(np.stack([np.concatenate([g.edge_dst for g in graphs]) + shift,
                                                     np.concatenate([g.edge_src for g in graphs]) + shift]).astype(np.int64)),
            "dist": torch.from_numpy(np.concatenate([g.edge_dist for g in graphs])),
            "vec": torch.from_numpy(np.concatenate([g.edge_vec for g in graphs]).reshape(-1, 3)),
            "batch": torch.from_numpy(np.repeat(np.arange(len(graphs)), counts)),
            "num_nodes": torch.tensor(counts),
        }
        with torch.no_grad():
            model(inputs)
    return time.perf_counter() - t


def probes(name: str, frame: pd.DataFrame, structures, parts: dict) -> str:
    """Ridge test MAE of every combination of the vector's parts, on cmma's grouped split."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    z, offsets, _, _ = arrays(structures)
    owners = torch.from_numpy(np.repeat(np.arange(len(structures)), np.diff(offsets)))
    found = {**{p: parts[p] for p in ("layers", "crystal", "energy")},
             "composition": composition(torch.from_numpy(z), owners, len(structures)).numpy()}
    test = (assign_splits(frame, 0.1, 0.1, 0)["split"] == "test").to_numpy() & parts["ok"]
    train = ~test & parts["ok"]
    rows = []
    for target in TABLES[name][2]:
        y = pd.to_numeric(frame[target], errors="coerce").to_numpy(float)
        known = np.isfinite(y)
        dummy = np.abs(y[test & known] - y[train & known].mean()).mean()
        for r in range(1, len(FEATURES) + 1):
            for combo in itertools.combinations(FEATURES, r):
                x = np.concatenate([found[p] for p in combo], axis=1)
                model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
                model.fit(x[train & known], y[train & known])
                mae = np.abs(model.predict(x[test & known]) - y[test & known]).mean()
                rows.append([target, "+".join(combo), x.shape[1], round(float(mae), 4), round(float(dummy), 4)])
    rows.sort(key=lambda row: (row[0], row[3]))
    return md_table(["target", "parts", "width", "ridge test MAE", "dummy MAE"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=sorted(TABLES), default="mp20")
    parser.add_argument("--limit", type=int, default=None, help="first N structures only")
    parser.add_argument("--backbones", default="chgnet,sevenn")
    parser.add_argument("--probes", action="store_true", help="also the ridge probes of every feature combination")
    args = parser.parse_args()
    if not TABLES[args.data][0].exists():
        sys.exit(f"The real data is not at {DATA}: this benchmark needs ../shared/data beside the repository.")
    torch.set_num_threads(1)
    frame, structures = load(args.data, args.limit)
    n = len(structures)
    rows, first = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for name in [b.strip() for b in args.backbones.split(",") if b.strip()]:
            try:
                spec, parts, cold, warm = backbone_parts(name, structures, Path(tmp))
            except Exception as exc:  # a backbone whose package is missing: say so and go on
                console.print(f"{name}: skipped ({exc})")
                continue
            first = first or (name, parts)
            rows.append([f"{name} frozen, cold cache (graphs + forward)", f"{n / cold:.1f}", f"{1000 * cold / n:.2f}",
                         spec["dim"]])
            rows.append([f"{name} frozen, warm cache (read)", f"{n / warm:.0f}", f"{1000 * warm / n:.3f}", spec["dim"]])
    seconds = schnet_seconds(structures)
    rows.append(["schnet from scratch (build_graph + forward, no grad)", f"{n / seconds:.1f}", f"{1000 * seconds / n:.2f}",
                 128])
    print(f"### {args.data}: {n} structures, one process, one torch thread\n")
    print(md_table(["path", "structures/s", "ms/structure", "vector width"], rows))
    if args.probes and first is not None:
        print(f"\n### {args.data}: ridge probes on {first[0]}'s frozen parts (cmma's grouped test split)\n")
        print(probes(args.data, frame, structures, first[1]))


if __name__ == "__main__":
    main()
