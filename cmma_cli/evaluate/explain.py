"""What drives the similarity of a (structure, text) or (structure, XRD) pair of one material.

- Atoms: each atom's node embedding (the structure encoder's per-atom output, before pooling) is
  passed through the structure projection head and dotted with the other modality's normalised
  embedding; positive atoms pull the pair together. Reported per atom and averaged per element.
- Text: gradient x input on the sentence model's token embeddings, of the cosine similarity between
  the text's and the structure's embeddings (word pieces merged into words).
- XRD: gradient x input on the pattern's intensities, summed over 2-theta regions.

``cmma evaluate --explain ID`` runs this for one material; the report renders a few test materials.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from cmma_cli.errors import CMMAError
from cmma_cli.evaluate.data import EvalData
from cmma_cli.modalities import get_modality
from cmma_cli.modalities.base import Context
from cmma_cli.modalities.batches import MaterialSet
from cmma_cli.modalities.text import material_texts
from cmma_cli.model import CMMAModel, load_model
from cmma_cli.workspace import Workspace

DESCRIPTION = (
    "Per-atom contributions are each atom's node embedding projected into the shared space and dotted with the "
    "other modality's embedding; text and XRD attributions are gradient x input of the pair's cosine similarity "
    "(per word, and summed per 2θ region). Positive values pull the pair together."
)
SPECIAL_TOKENS = {"[CLS]", "[SEP]", "[PAD]", "<s>", "</s>", "<pad>"}


def _material_row(ws: Workspace, material_id: str, modalities: list[str]) -> pa.Table:
    path = ws.processed / "materials.parquet"
    columns = ["material_id", "formula"]
    for m in modalities:
        columns += [c for c in get_modality(m).columns if c not in columns]
    available = pq.ParquetFile(path).schema_arrow.names
    table = pq.read_table(path, columns=[c for c in columns if c in available])
    row = table.filter(pc.equal(table["material_id"].cast(pa.string()), material_id))
    if row.num_rows == 0:
        raise CMMAError(f"There is no material {material_id!r} in {path}: pass a material_id from processed/ "
                        "(e.g. one listed by `cmma retrieve`).")
    return row.slice(0, 1)


def atom_contributions(model: CMMAModel, inputs: dict[str, torch.Tensor], other: torch.Tensor) -> np.ndarray:
    """(atoms,) each atom's projected node embedding (normalised) dotted with the unit vector ``other``."""
    captured: dict[str, torch.Tensor] = {}
    hook = model.encoders["structure"].atom_mlp.register_forward_hook(lambda mod, inp, out: captured.__setitem__("h", out))
    try:
        with torch.no_grad():
            model.embed("structure", inputs)
            per_atom = F.normalize(model.heads["structure"](captured["h"]).float(), dim=-1)
    finally:
        hook.remove()
    return (per_atom @ other).cpu().numpy()


def token_attributions(model: CMMAModel, text: str, other: torch.Tensor) -> list[tuple[str, float]]:
    """(word, gradient x input) for the words of ``text`` against the unit vector ``other``."""
    encoder = model.encoders["text"]
    sentence = encoder._model()
    device = next(sentence.parameters()).device
    tokens = sentence.tokenizer([text], truncation=True, max_length=encoder.spec["max_length"], return_tensors="pt")
    features = {k: v.to(device) for k, v in tokens.items()}
    embedding_layer = sentence[0].auto_model.get_input_embeddings()
    captured: dict[str, torch.Tensor] = {}

    def keep(module, inp, out):
        out = out.detach().requires_grad_(True)
        captured["e"] = out
        return out

    hook = embedding_layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            vec = sentence(dict(features))["sentence_embedding"]
            z = F.normalize(model.heads["text"](vec.float()), dim=-1)[0]
            (z @ other).backward()
    finally:
        hook.remove()
    e = captured["e"]
    scores = (e.grad * e).sum(-1)[0].detach().cpu().numpy()
    tokens = sentence.tokenizer.convert_ids_to_tokens(features["input_ids"][0].tolist())
    words: list[tuple[str, float]] = []
    for token, score in zip(tokens, scores):
        if token in SPECIAL_TOKENS:
            continue
        if token.startswith("##") and words:
            words[-1] = (words[-1][0] + token[2:], words[-1][1] + float(score))
        else:
            words.append((token, float(score)))
    return words


def region_attributions(model: CMMAModel, pattern: torch.Tensor, other: torch.Tensor, grid: dict[str, Any],
                        width: float) -> list[dict[str, float]]:
    """Gradient x input of the XRD side summed over 2-theta regions of ``width`` degrees."""
    x = pattern.detach().float().clamp_min(1e-12).requires_grad_(True)
    with torch.enable_grad():
        z = model.embed("xrd", {"pattern": x[None]})[0]
        (z @ other).backward()
    per_point = (x.grad * x).detach().cpu().numpy()
    start, step = float(grid["two_theta_min"]), float(grid["step"])
    two_theta = start + step * np.arange(len(per_point))
    edges = np.arange(start, float(grid["two_theta_max"]) + width, width)
    regions = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (two_theta >= lo) & (two_theta < hi)
        regions.append({"start": float(lo), "end": float(hi), "score": float(per_point[sel].sum())})
    return regions


def _figure(pair: dict[str, Any], path: Path, pattern: np.ndarray | None, grid: dict[str, Any] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110, gridspec_kw={"width_ratios": [1, 2]})
    els = list(pair["elements"])
    vals = [pair["elements"][e] for e in els]
    axes[0].bar(els, vals, color=["tab:green" if v >= 0 else "tab:red" for v in vals])
    axes[0].axhline(0, color="black", linewidth=0.6)
    axes[0].set_title(f"atoms vs {pair['other']} (mean per element)", fontsize=9)
    if "regions" in pair and pattern is not None and grid is not None:
        ax = axes[1]
        two_theta = grid["two_theta_min"] + grid["step"] * np.arange(len(pattern))
        ax.plot(two_theta, pattern, color="black", linewidth=0.7)
        twin = ax.twinx()
        mids = [(r["start"] + r["end"]) / 2 for r in pair["regions"]]
        scores = [r["score"] for r in pair["regions"]]
        twin.bar(mids, scores, width=(pair["regions"][0]["end"] - pair["regions"][0]["start"]) * 0.9, alpha=0.35,
                 color=["tab:green" if s >= 0 else "tab:red" for s in scores])
        ax.set_xlabel("2θ (degrees)")
        ax.set_title("XRD pattern and per-region attribution", fontsize=9)
    elif "tokens" in pair:
        top = pair["top_tokens"][::-1]
        axes[1].barh([t["token"] for t in top], [t["score"] for t in top],
                     color=["tab:green" if t["score"] >= 0 else "tab:red" for t in top])
        axes[1].set_title("words by gradient x input", fontsize=9)
    fig.suptitle(f"{pair['material_id']}: {pair['pair']} (cosine {pair['similarity']:.3f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def explain_material(ws: Workspace, data: EvalData, material_id: str, cfg: Any, figures: Path | None,
                     model: CMMAModel | None = None, top: int = 8) -> dict[str, Any]:
    """Attributions of every (structure, text) and (structure, xrd) pair the material has."""
    if model is None:
        model = load_explain_model(data)
    spec = model.spec
    row = _material_row(ws, material_id, model.modalities)
    ctx = Context(data.processed_manifest, cache_dir=ws.cache, show_progress=False)
    materials = MaterialSet(row, {m: spec["encoders"][m] for m in model.modalities}, ctx)
    batch = materials.collate(np.array([0]))
    split = data.materials.set_index("material_id")["split"].get(material_id, "?")
    out: dict[str, Any] = {"material_id": material_id, "formula": str(row.column("formula")[0].as_py()),
                           "split": split, "pairs": []}
    if "structure" not in batch["inputs"]:
        raise CMMAError(f"Material {material_id} has no structure graph in processed/, so there are no atoms to "
                        "attribute: pick a material with a structure.")
    with torch.no_grad():
        z = {m: model.embed(m, x)[0] for m, x in batch["inputs"].items()}
    z_struct = z["structure"]
    atomic_numbers = batch["inputs"]["structure"]["z"].numpy()
    from pymatgen.core import Element

    symbols = [Element.from_Z(int(n)).symbol for n in atomic_numbers]
    grid = data.processed_manifest.get("xrd_grid")
    for other in ("text", "xrd"):
        if other not in z:
            continue
        pair: dict[str, Any] = {"pair": f"structure-{other}", "other": other, "material_id": material_id,
                                "similarity": float(z_struct @ z[other])}
        atoms = atom_contributions(model, batch["inputs"]["structure"], z[other])
        pair["atoms"] = [{"index": i, "element": s, "score": float(v)} for i, (s, v) in enumerate(zip(symbols, atoms))]
        pair["elements"] = {s: float(np.mean([v for sym, v in zip(symbols, atoms) if sym == s]))
                            for s in dict.fromkeys(symbols)}
        pattern = None
        if other == "text":
            text = material_texts(row, spec["encoders"]["text"]["sources"])[0][0]
            words = token_attributions(model, text, z_struct.detach())
            pair["text"] = text
            pair["tokens"] = [{"token": w, "score": s} for w, s in words]
            pair["top_tokens"] = sorted(pair["tokens"], key=lambda t: -abs(t["score"]))[:top]
        else:
            pattern = batch["inputs"]["xrd"]["pattern"][0]
            pair["regions"] = region_attributions(model, pattern, z_struct.detach(), grid, cfg.xrd_region)
            pair["top_regions"] = sorted(pair["regions"], key=lambda r: -abs(r["score"]))[:3]
        if figures is not None:
            name = f"explain_{safe_filename(material_id)}_{other}.png"
            _figure(pair, figures / name, None if pattern is None else pattern.numpy(), grid)
            pair["figure"] = name
        out["pairs"].append(pair)
    if not out["pairs"]:
        raise CMMAError(f"Material {material_id} has a structure but neither text nor an XRD pattern in this run: "
                        "there is no pair to explain.")
    return out


def safe_filename(name: str) -> str:
    """``name`` with every character but letters, digits and ``-_.`` replaced by ``_`` (for file names)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def load_explain_model(data: EvalData, device: str = "cpu") -> CMMAModel:
    """The run's model (the checkpoint its embeddings were made with)."""
    if data.checkpoint is None:
        raise CMMAError(f"The embeddings of run {data.run} name no checkpoint: run `cmma embed --run {data.run} --force`.")
    model, _ = load_model(data.checkpoint, device)
    if "structure" not in model.modalities:
        raise CMMAError(f"Run {data.run} has no structure encoder, so there are no atoms to attribute.")
    return model


def run_explain_examples(ws: Workspace, data: EvalData, cfg: Any, figures: Path) -> dict[str, Any]:
    """Explanations of the first ``cfg.explain_examples`` test materials with the most modalities."""
    out: dict[str, Any] = {"description": DESCRIPTION, "examples": []}
    if cfg.explain_examples == 0:
        out["note"] = "No examples asked for (--explain-examples 0)."
        return out
    model = load_explain_model(data)
    if not ({"text", "xrd"} & set(model.modalities)):
        out["note"] = "The run has neither text nor XRD beside the structure: nothing to explain."
        return out
    have = {m: set(data.tables[m].ids) for m in data.modalities}
    test = [m for m in data.split_ids("test") if m in have.get("structure", set())]
    test.sort(key=lambda m: -sum(m in have[t] for t in ("text", "xrd") if t in have))
    for mid in test[: cfg.explain_examples]:
        out["examples"].append(explain_material(ws, data, mid, cfg, figures, model))
    if not out["examples"]:
        out["note"] = "No test material has a structure to explain."
    return out


def run_explain(ws: Workspace, cfg: Any, material_id: str) -> dict[str, Any]:
    """``cmma evaluate --explain ID``: one material's attributions, printed and written to ``reports/<run>/explain/``."""
    from cmma_cli.console import console
    from cmma_cli.evaluate.data import load_eval_data
    from cmma_cli.evaluate.pipeline import resolve_run
    from cmma_cli.evaluate.report import render_explanation
    from cmma_cli.workspace import write_json

    run = resolve_run(ws, cfg.run)
    data = load_eval_data(ws, run)
    folder = ws.reports_dir(run) / "explain"
    folder.mkdir(parents=True, exist_ok=True)
    result = explain_material(ws, data, material_id, cfg, folder)
    stem = safe_filename(material_id)
    write_json(result, folder / f"{stem}.json")
    lines = [f"# What drives the cross-modal similarity of {material_id} (run `{run}`, {result['split']} split)", "",
             DESCRIPTION, ""] + render_explanation(result, figure_prefix="")
    (folder / f"{stem}.md").write_text("\n".join(lines) + "\n")
    for pair in result["pairs"]:
        console.print(f"[bold]{material_id} ({result['formula']}), {pair['pair']}[/]: cosine {pair['similarity']:.3f}",
                      highlight=False)
        console.print("  atoms, mean per element: " + ", ".join(f"{e} {v:+.3f}" for e, v in pair["elements"].items()),
                      highlight=False)
        if "top_tokens" in pair:
            console.print("  words: " + ", ".join(f"{t['token']} {t['score']:+.3f}" for t in pair["top_tokens"]),
                          highlight=False)
        if "top_regions" in pair:
            console.print("  2θ regions: " + ", ".join(f"{r['start']:.0f}-{r['end']:.0f}° {r['score']:+.3f}"
                                                      for r in pair["top_regions"]), highlight=False)
    console.print(f"Written: {folder / (stem + '.md')} (with figures).", highlight=False)
    return result
