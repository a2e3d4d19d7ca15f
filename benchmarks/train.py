"""Training-step speed of the default three-modality model (structure, text, xrd), split into its parts.

    .venv/bin/python benchmarks/train.py                  # CPU, and the GPU too when there is one
    .venv/bin/python benchmarks/train.py -w data/demo --batch-size 256 --steps 20 --devices cuda

Uses a workspace whose ``processed/`` exists (default: the built-in sample, fetched and preprocessed
into ``--workspace`` when it is missing). For each device it times, per step and synchronised:

- ``data loading``: collating one batch in this process (numpy -> tensors) and moving it to the device;
- ``<modality> forward``: each encoder with its projection head;
- ``loss``; the backward pass split exactly into ``loss backward`` and each ``<modality> backward``;
- ``clip + AdamW step``;

then prints materials/s of the whole step, and separately the throughput of the real ``DataLoader``
(workers, pinned memory) alone, which must stay far above the step's so that loading never bounds a
GPU. The model is ``TrainConfig()``'s default, text frozen (its cached sentence embeddings), as
``cmma train`` runs it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from cmma_cli.config import PreprocessConfig, TrainConfig
from cmma_cli.console import console
from cmma_cli.loss import MultiModalInfoNCE, parse_pairs
from cmma_cli.modalities.base import Context
from cmma_cli.modalities.batches import BatchDataset, MaterialSet, to_device
from cmma_cli.model import build_model, model_spec
from cmma_cli.train import param_groups, read_splits, usable
from cmma_cli.workspace import Workspace, read_manifest


def ensure_workspace(ws: Workspace) -> None:
    """Fetch and preprocess the built-in sample into ``ws`` unless it already has processed data."""
    if read_manifest(ws.processed) is not None:
        return
    from cmma_cli.config import FetchConfig
    from cmma_cli.fetch import run_fetch
    from cmma_cli.preprocess.pipeline import run_preprocess

    run_fetch(ws, FetchConfig(source="sample"), api_key=None)
    run_preprocess(ws, PreprocessConfig())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_device(ws: Workspace, cfg: TrainConfig, device: torch.device, batch_size: int, steps: int,
                 workers: int) -> tuple[dict[str, float], float, float]:
    """(median seconds per part, step materials/s, DataLoader materials/s) on ``device``."""
    torch.manual_seed(0)
    manifest = read_manifest(ws.processed)
    ctx = Context(manifest, cache_dir=ws.cache, show_progress=False)
    train_table, _ = read_splits(ws, cfg.modalities)
    spec = model_spec(cfg, train_table, ctx)
    materials = MaterialSet(train_table, spec["encoders"], ctx)
    rows = usable(materials)
    batch_size = min(batch_size, len(rows))
    model = build_model(spec).to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, cfg))
    loss_fn = MultiModalInfoNCE(parse_pairs(cfg.pairs, cfg.modalities))
    bf16 = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    rng = np.random.default_rng(0)
    parts: dict[str, list[float]] = {}

    def timed(name: str, t0: float) -> float:
        _sync(device)
        now = time.perf_counter()
        parts.setdefault(name, []).append(now - t0)
        return now

    for step in range(steps + 2):  # two warm-up steps are not counted
        if step == 2:
            parts.clear()
        _sync(device)
        t = time.perf_counter()
        batch = materials.collate(rng.choice(rows, batch_size, replace=False), rng)
        batch = to_device(batch, device)
        t = timed("data loading (collate + copy)", t)
        features = {}
        with autocast:
            for m in cfg.modalities:
                if m in batch["inputs"]:
                    z = model.embed(m, batch["inputs"][m])
                    features[m] = z.new_zeros(batch_size, model.embed_dim).index_put((batch["masks"][m],), z)
                    t = timed(f"{m} forward", t)
        scale = model.scale()
        loss, _ = loss_fn(features, batch["masks"], scale)
        t = timed("loss", t)
        # the backward pass in pieces that add up to loss.backward(): through the loss to the features,
        # then through each encoder on its own
        optimizer.zero_grad(set_to_none=True)
        names = list(features)
        grads = torch.autograd.grad(loss, [features[m] for m in names] + [scale])
        scale.backward(grads[-1])
        t = timed("loss backward", t)
        for m, g in zip(names, grads):
            features[m].backward(g)
            t = timed(f"{m} backward", t)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        timed("clip + AdamW step", t)
    means = {k: float(np.median(v)) for k, v in parts.items()}  # medians: robust to a busy machine
    step_rate = batch_size / sum(means.values())

    # the real loader over many random batches (training-style keys: sampled text, seeded rng)
    keys = [(rng.choice(rows, batch_size, replace=False), (0, 0, k, 0)) for k in range(8 * steps + 8)]
    loader = torch.utils.data.DataLoader(
        BatchDataset(materials), batch_size=None, sampler=keys, num_workers=workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    seen, started = 0, None
    for k, batch in enumerate(loader):
        batch = to_device(batch, device)
        if k == 7:  # the first batches pay for starting the workers
            _sync(device)
            started = time.perf_counter()
        elif k > 7:
            seen += batch_size
    _sync(device)
    load_rate = seen / (time.perf_counter() - started)
    return means, step_rate, load_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-w", "--workspace", type=Path, default=Path("data/bench-sample"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--devices", default="auto", help="cpu, cuda, or auto (cpu, plus cuda when available)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the loading benchmark")
    parser.add_argument("--structure-encoder", default="schnet")
    args = parser.parse_args()

    ws = Workspace.resolve(args.workspace)
    ensure_workspace(ws)
    cfg = TrainConfig(structure_encoder=args.structure_encoder)
    names = ["cpu", "cuda"] if args.devices == "auto" else args.devices.split(",")
    names = [n for n in names if n != "cuda" or torch.cuda.is_available()]
    for name in names:
        device = torch.device(name)
        means, step_rate, load_rate = bench_device(ws, cfg, device, args.batch_size, args.steps, args.workers)
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
        table = Table(title=f"{label}: one training step, batch {args.batch_size}, {cfg.structure.encoder}, "
                            f"d={cfg.embed_dim}", title_justify="left")
        table.add_column("part")
        table.add_column("ms / step", justify="right")
        table.add_column("share", justify="right")
        total = sum(means.values())
        for part, seconds in means.items():
            table.add_row(part, f"{1000 * seconds:.1f}", f"{100 * seconds / total:.0f} %")
        table.add_row("[bold]total", f"[bold]{1000 * total:.1f}", "100 %")
        console.print(table)
        console.print(f"training step: [bold]{step_rate:,.0f} materials/s[/]; DataLoader alone ({args.workers} "
                      f"workers{', pinned' if device.type == 'cuda' else ''}): [bold]{load_rate:,.0f} materials/s[/]")


if __name__ == "__main__":
    main()
