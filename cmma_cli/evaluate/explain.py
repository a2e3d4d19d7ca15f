"""What drives the similarity of one material's pairs of modalities (e.g. structure-text, structure-XRD).

The registry says which pairs are explained: every modality that :attr:`~cmma_cli.modalities.base.Modality.
explain_anchor`\\ s them (the structure) against every other modality of the run with an
:attr:`~cmma_cli.modalities.base.Modality.attribution`. Each side of a pair is attributed by its own
modality's :meth:`~cmma_cli.modalities.base.Modality.attribute` hook against the other side's embedding
(per atom, per word, per 2-theta region, ...); this module collects and renders what the hooks return.

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

from cmma_cli.errors import CMMAError
from cmma_cli.evaluate.data import EvalData
from cmma_cli.modalities import REGISTRY, get_modality
from cmma_cli.modalities.base import Attribution, Context, ExplainContext
from cmma_cli.modalities.batches import MaterialSet
from cmma_cli.model import CMMAModel, load_model
from cmma_cli.workspace import Workspace

DESCRIPTION = (
    "Per-atom contributions are each atom's node embedding projected into the shared space and dotted with the "
    "other modality's embedding; text and XRD attributions are gradient x input of the pair's cosine similarity "
    "(per word, and summed per 2θ region). Positive values pull the pair together."
)
#: How many of the strongest items (words) an attribution lists.
TOP = 8


def explain_pairs(modalities: list[str]) -> list[tuple[str, str]]:
    """``(anchor, other)``: the pairs among ``modalities`` whose similarity the registered modalities can explain."""
    return [(a, o) for a in modalities if get_modality(a).explain_anchor and get_modality(a).attribution
            for o in modalities if o != a and get_modality(o).attribution]


def _either(names: list[str], word: str = "or") -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {word} {names[-1]}"


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


def _figure(pair: dict[str, Any], path: Path, sides: list[Attribution]) -> None:
    """The pair's figure: the anchor's attribution on the left, the other side's on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110, gridspec_kw={"width_ratios": [1, 2]})
    for ax, side in zip(axes, sides):
        if side.plot is not None:
            side.plot(ax)
    fig.suptitle(f"{pair['material_id']}: {pair['pair']} (cosine {pair['similarity']:.3f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def explain_material(ws: Workspace, data: EvalData, material_id: str, cfg: Any, figures: Path | None,
                     model: CMMAModel | None = None, top: int = TOP) -> dict[str, Any]:
    """Attributions of every explainable pair (:func:`explain_pairs`) the material has."""
    if model is None:
        model = load_explain_model(data)
    spec = model.spec
    pairs = explain_pairs(model.modalities)
    row = _material_row(ws, material_id, model.modalities)
    ctx = Context(data.processed_manifest, cache_dir=ws.cache, show_progress=False)
    materials = MaterialSet(row, {m: spec["encoders"][m] for m in model.modalities}, ctx)
    batch = materials.collate(np.array([0]))
    inputs = batch["inputs"]
    split = data.materials.set_index("material_id")["split"].get(material_id, "?")
    out: dict[str, Any] = {"material_id": material_id, "formula": str(row.column("formula")[0].as_py()),
                           "split": split, "pairs": []}
    anchors = list(dict.fromkeys(a for a, _ in pairs))
    if not any(a in inputs for a in anchors):
        what = _either([get_modality(a).attribution for a in anchors])
        raise CMMAError(f"Material {material_id} has no {_either(anchors)} in processed/, so there are no {what} to "
                        f"attribute: pick a material with a {_either(anchors)}.")
    with torch.no_grad():
        z = {m: model.embed(m, x)[0] for m, x in inputs.items()}

    def side(m: str, other: str) -> Attribution:
        settings = getattr(cfg, "settings", {}).get(m)  # its evaluate section, if it declares one
        context = ExplainContext(row, spec["encoders"][m], settings, data.processed_manifest, partner=other, top=top)
        return get_modality(m).attribute(model.encoders[m], model.heads[m], inputs[m], z[other].detach(), context)

    for anchor, other in pairs:
        if anchor not in z or other not in z:
            continue
        pair: dict[str, Any] = {"pair": f"{anchor}-{other}", "other": other, "material_id": material_id,
                                "similarity": float(z[anchor] @ z[other])}
        sides = [side(anchor, other), side(other, anchor)]
        for s in sides:
            pair.update(s.fields)
        if figures is not None:
            name = f"explain_{safe_filename(material_id)}_{other}.png"
            _figure(pair, figures / name, sides)
            pair["figure"] = name
        out["pairs"].append(pair)
    if not out["pairs"]:
        present = [a for a in anchors if a in inputs]
        others = list(dict.fromkeys(o for a, o in pairs if a in present))
        raise CMMAError(f"Material {material_id} has a {_either(present)} but neither {_either(others, 'nor')} in this "
                        "run: there is no pair to explain.")
    return out


def safe_filename(name: str) -> str:
    """``name`` with every character but letters, digits and ``-_.`` replaced by ``_`` (for file names)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def load_explain_model(data: EvalData, device: str = "cpu") -> CMMAModel:
    """The run's model (the checkpoint its embeddings were made with)."""
    if data.checkpoint is None:
        raise CMMAError(f"The embeddings of run {data.run} name no checkpoint: run `cmma embed --run {data.run} --force`.")
    model, _ = load_model(data.checkpoint, device)
    anchors = [n for n in model.modalities if get_modality(n).explain_anchor]
    if not anchors:
        known = [name for name, m in REGISTRY.items() if m.explain_anchor]
        what = _either([get_modality(a).attribution for a in known]) if known else "items"
        raise CMMAError(f"Run {data.run} has no {_either(known) if known else 'anchoring'} encoder, so there are no "
                        f"{what} to attribute.")
    return model


def run_explain_examples(ws: Workspace, data: EvalData, cfg: Any, figures: Path) -> dict[str, Any]:
    """Explanations of the first ``cfg.explain_examples`` test materials with the most modalities."""
    out: dict[str, Any] = {"description": DESCRIPTION, "examples": []}
    if cfg.explain_examples == 0:
        out["note"] = "No examples asked for (--explain-examples 0)."
        return out
    model = load_explain_model(data)
    pairs = explain_pairs(model.modalities)
    if not pairs:
        anchors = [a for a in model.modalities if get_modality(a).explain_anchor]
        others = [name for name, m in REGISTRY.items() if m.attribution and name not in anchors]
        out["note"] = (f"The run has neither {_either(others, 'nor')} beside the {_either(anchors)}: "
                       "nothing to explain.")
        return out
    anchors = list(dict.fromkeys(a for a, _ in pairs))
    others = list(dict.fromkeys(o for _, o in pairs))
    have = {m: set(data.tables[m].ids) for m in data.modalities}
    test = [m for m in data.split_ids("test") if any(m in have.get(a, set()) for a in anchors)]
    test.sort(key=lambda m: -sum(m in have[t] for t in others if t in have))
    for mid in test[: cfg.explain_examples]:
        out["examples"].append(explain_material(ws, data, mid, cfg, figures, model))
    if not out["examples"]:
        out["note"] = f"No test material has a {_either(anchors)} to explain."
    return out


def run_explain(ws: Workspace, cfg: Any, material_id: str) -> dict[str, Any]:
    """``cmma evaluate --explain ID``: one material's attributions, printed and written to ``reports/<run>/explain/``."""
    from cmma_cli.console import console, esc
    from cmma_cli.evaluate.data import load_eval_data, resolve_run
    from cmma_cli.evaluate.report import describe_pair, render_explanation
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
        console.print(f"[bold]{esc(material_id)} ({esc(result['formula'])}), {pair['pair']}[/]: cosine {pair['similarity']:.3f}",
                      highlight=False)
        for line in describe_pair(pair, markdown=False):
            console.print(esc(line), highlight=False)
    console.print(esc(f"Written: {folder / (stem + '.md')} (with figures)."), highlight=False)
    return result
