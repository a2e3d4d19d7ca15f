"""The report: ``metrics.json`` rendered as ``report.md`` (tables + figures) and as terminal tables.

Everything here is a pure function of the metrics dictionary (plus figure paths it lists), so the
markdown and the terminal always show the numbers that ``metrics.json`` holds.
"""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table

from cmma_cli.console import console, esc

REGRESSION_MODELS = ("dummy", "dummy_median", "ridge", "mlp")

#: The unit of each processed property (MAE and RMSE are in it); a property not listed is "in its own unit".
PROPERTY_UNITS = {"formation_energy_per_atom": "eV/atom", "energy_above_hull": "eV/atom", "band_gap": "eV",
                  "energy_per_atom": "eV/atom", "uncorrected_energy_per_atom": "eV/atom", "efermi": "eV",
                  "density": "g/cm³", "density_atomic": "Å³/atom", "volume": "Å³", "total_magnetization": "μB/f.u.",
                  "bulk_modulus": "GPa", "shear_modulus": "GPa", "nsites": "atoms", "nelements": "elements"}


def unit_of(prop: str) -> str:
    """The unit a property's errors are in (``prop units`` when the property is not a known one)."""
    return PROPERTY_UNITS.get(prop, f"{prop} units")


def section_note(section: dict[str, Any], name: str) -> list[str]:
    """The line under a section heading that this evaluate did not recompute (kept from an earlier one)."""
    if not section.get("carried"):
        return []
    if section.get("stale"):
        return ["**Stale:** kept from an earlier `cmma evaluate`, computed before the processed data or the embeddings "
                f"changed; rerun `cmma evaluate --sections {name}` to refresh it.", ""]
    return ["*Kept from an earlier `cmma evaluate` (not recomputed by this one; its inputs are unchanged).*", ""]


def pm(value: Any, spread: Any, digits: int = 3) -> str:
    """``value ± spread`` (the spread omitted when unknown)."""
    if spread is None or (isinstance(spread, float) and math.isnan(spread)):
        return fmt(value, digits)
    return f"{fmt(value, digits)} ± {fmt(spread, digits)}"
CLASSIFICATION_MODELS = ("dummy", "logistic", "mlp")


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table: ``digits`` decimals, ``-`` for missing or NaN."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- table rows


#: Per kind of target: the dummy's row label, the probe models, and the three metrics a table row shows.
ROW_SPECS = {"regression": ("dummy (train mean)", ("ridge", "mlp"), ("mae", "rmse", "r2")),
             "classification": ("dummy (majority)", ("logistic", "mlp"), ("accuracy", "macro_f1", "roc_auc"))}


def target_rows(metrics: dict[str, Any], kind: str, target: str) -> list[list[Any]]:
    """Rows (model, embedding / input, three metrics, n test) for one target: the dummy, the probes, the baselines."""
    dummy, models, keys = ROW_SPECS[kind]
    rows = []
    by_table = metrics.get("probes", {}).get(kind, {}).get(target, {})
    if "unified" in by_table:
        s = by_table["unified"]["dummy"]
        rows.append([dummy, "-", *(s[k] for k in keys), s["n"]])
        if kind == "regression" and "dummy_median" in by_table["unified"]:  # reports made before it lack it
            s = by_table["unified"]["dummy_median"]
            rows.append(["dummy (train median)", "-", *(s[k] for k in keys), s["n"]])
    for table, scores in by_table.items():
        for model in models:
            s = scores[model]
            rows.append([f"CMMA {model} probe", table, *(s[k] for k in keys), s["n"]])
    for name, s in metrics.get("baselines", {}).get(kind, {}).get(target, {}).items():
        rows.append([f"supervised {name}", s.get("inputs", "-"), *(s[k] for k in keys), s["n"]])
    return rows


#: Per kind of target: the metric the verdict compares, whether lower is better, and the linear probe's name.
VERDICTS = {"regression": ("mae", True, "ridge"), "classification": ("macro_f1", False, "logistic")}


def verdict_rows(metrics: dict[str, Any], kind: str = "regression") -> list[list[Any]]:
    """Per target: dummy, CMMA's unified probes, the supervised baselines, and a verdict fixed in advance:
    the CMMA MLP probe on the unified embedding against intermediate fusion (both see every modality).
    ``kind``: ``regression`` (test MAE) or ``classification`` (test macro F1)."""
    key, lower, linear = VERDICTS[kind]
    pick = min if lower else max
    rows = []
    probes = metrics.get("probes", {}).get(kind, {})
    baselines = metrics.get("baselines", {}).get(kind, {})
    for target, by_table in probes.items():
        base = baselines.get(target, {})
        uni = by_table.get("unified")
        if not base or uni is None:
            continue
        single = {k: v for k, v in base.items() if k not in ("intermediate fusion", "late fusion")}
        best_single = pick(single.items(), key=lambda kv: kv[1][key]) if single else None
        fusion = base.get("intermediate fusion")
        verdict = "-"
        if fusion:
            ours, theirs = uni["mlp"][key], fusion[key]
            if ours == theirs:
                verdict = "tie"
            elif kind == "regression":
                gap = (ours - theirs) / theirs if theirs else 0.0
                verdict = f"CMMA better by {-gap:.0%}" if gap < 0 else f"fusion better by {gap:.0%}"
            else:
                verdict = f"CMMA better by {ours - theirs:.3f}" if ours > theirs else f"fusion better by {theirs - ours:.3f}"
        dummies = [uni["dummy"][key]] + ([uni.get("dummy_median", {}).get(key)] if kind == "regression" else [])
        rows.append([target, *dummies, uni[linear][key], uni["mlp"][key],
                     f"{fmt(best_single[1][key])} ({best_single[0]})" if best_single else "-",
                     fusion[key] if fusion else None, base.get("late fusion", {}).get(key), verdict])
    return rows


def retrieval_rows(metrics: dict[str, Any], ks: list[int]) -> list[list[Any]]:
    """One row per ordered pair: each metric followed by its chance value."""
    rows = []
    for pair, s in metrics.get("retrieval", {}).get("pairs", {}).items():
        row: list[Any] = [pair, s["queries"]]
        for k in ks:
            row += [pm(s[f"recall@{k}"], s.get(f"recall@{k}_se")), s[f"chance_recall@{k}"]]
        row += [pm(s["mrr"], s.get("mrr_se")), s["chance_mrr"], s["map"], s["chance_map"], s["mean_rank"], s["median_rank"], s["chance_mean_rank"]]
        rows.append(row)
    return rows


def retrieval_header(ks: list[int]) -> list[str]:
    header = ["pair (query->gallery)", "n (queries)"]
    for k in ks:
        header += [f"R@{k} (share)", f"chance R@{k}"]
    return header + ["MRR (0-1)", "chance MRR", "mAP (0-1)", "chance mAP", "mean rank (position)",
                     "median rank (position)", "chance rank"]


# --------------------------------------------------------------------------------------------- markdown

#: What the baselines' description said before it stopped assuming probe tables above it (old metrics.json).
_OLD_PLACEMENT = " They appear in the property and classification tables above, below the CMMA probes."


def _has_rows(baselines: dict[str, Any]) -> bool:
    return any(baselines.get(kind) for kind in ("regression", "classification"))



SECTION_ORDER = ("probes", "retrieval", "synthesis", "latent", "baselines", "explain")
#: Training settings shown first in the report's settings table (the rest follow, sorted).
_KEY_SETTINGS = ("seed", "epochs", "batch_size", "lr", "embed_dim", "temperature", "learn_temperature", "modalities",
                 "pairs", "objective", "text_model")


def settings_lines(info: dict[str, Any]) -> list[str]:
    """The seeds and the run's training hyperparameters (from its ``runs/<run>/manifest.json``)."""
    out = ["## Settings", "", f"Evaluation seed {info.get('seed')} (probe MLPs, baselines, bootstrap), training seed "
           f"{info.get('train_seed', '-')}.", ""]
    config = info.get("train_config") or {}
    if not config:
        return out + ["The run's training settings are unknown (its runs/ folder has no manifest).", ""]
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):  # a modality's own section
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    keys = [k for k in _KEY_SETTINGS if k in flat] + sorted(k for k in flat if k not in _KEY_SETTINGS)
    rows = [[k, ", ".join(map(str, v)) if isinstance(v, list) else ("-" if v is None else str(v))] for k, v in
            ((k, flat[k]) for k in keys)]
    return out + ["Training hyperparameters of the run:", "", md_table(["setting", "value"], rows), ""]


def render_markdown(metrics: dict[str, Any]) -> str:
    """The whole ``report.md``."""
    info = metrics["run"]
    ks = info["ks"]
    out = [f"# CMMA evaluation: run `{info['run']}`", ""]
    out.append(f"Checkpoint `{info.get('checkpoint')}` (epoch {info.get('epoch')}), modalities "
               f"{', '.join(info['modalities'])}, embedding dimension {info.get('dim')}. Every score below is "
               "computed on the **test split**, which training, probe fitting and model selection never saw.")
    out.append("")
    splits = info["splits"]
    out.append(md_table(["split", "materials", *info["modalities"]],
                        [[s, splits[s]["materials"], *(splits[s].get(m, 0) for m in info["modalities"])]
                         for s in ("train", "val", "test")]))
    out.append("")
    out.append(f"Reproduce: `{info['command']}`")
    out.append("")
    out += settings_lines(info)
    carried = metrics.get("carried") or []
    if carried:
        stale = [n for n in carried if metrics.get(n, {}).get("stale")]
        out += [f"This evaluate recomputed {', '.join(n for n in metrics if n in SECTION_ORDER and n not in carried)}; "
                f"kept from an earlier one: {', '.join(carried)}"
                + (f" (**stale**: {', '.join(stale)}, whose inputs changed since)." if stale else "."), ""]

    probes = metrics.get("probes")
    if probes is not None:
        out += ["## Property probes (regression)", "", *section_note(probes, "probes"),
                "Ridge (penalty chosen on val) and a one-hidden-layer MLP fitted on the train split's frozen "
                "embeddings, scored on test; one dummy predicts the train mean, the other the train median (on a "
                "target that is mostly one value, such as band gaps that are mostly 0, the median dummy is the floor "
                "to beat). Supervised baselines, where run, "
                "are trained on the same split with the same encoders and scored on the same test materials "
                "that have their inputs.", ""]
        for prop in probes["regression"]:
            unit = unit_of(prop)
            out += [f"### {prop}", "", md_table(["model", "embedding / input", f"MAE ({unit})", f"RMSE ({unit})",
                                                 "R² (1 = perfect)", "n test (materials)"],
                                                target_rows(metrics, "regression", prop)), ""]
        out += ["## Classification probes", "",
                "Logistic regression (penalty chosen on val) and an MLP, scored on test beside a dummy that always "
                "predicts the train split's majority class.", ""]
        for task, source in probes.get("label_sources", {}).items():
            if task in probes["classification"]:
                out += [f"### {task} (labels: {source})", "",
                        md_table(["model", "embedding", "accuracy (share)", "macro F1 (0-1)", "ROC AUC (0-1)",
                                  "n test (materials)"],
                                 target_rows(metrics, "classification", task)), ""]
        if probes["skipped"]:
            out += ["Probes not run: " + "; ".join(f"{s['target']} on {s['table']} ({s['reason']})"
                                                   for s in probes["skipped"]) + ".", ""]

    retrieval = metrics.get("retrieval")
    if retrieval is not None:
        out += ["## Cross-modal retrieval (test split)", "", *section_note(retrieval, "retrieval"),
                "Each test material with both modalities is a query and a gallery item; Recall@K, MRR and ranks "
                "count its own match, mAP also counts the gallery materials of the same composition. Chance is "
                "the expectation under a random ranking of the same gallery. Recall@K and MRR are shares of the "
                "queries (0-1); ± is the standard error over "
                f"{retrieval.get('bootstrap', {}).get('resamples', 'bootstrap')} bootstrap resamples of the test "
                "queries; ranks are positions in the gallery (1 = first).", ""]
        if retrieval["pairs"]:
            out += [md_table(retrieval_header(ks), retrieval_rows(metrics, ks)), ""]
        for s in retrieval["skipped"]:
            out.append(f"- {s['pair']}: not run ({s['reason']}).")
        out.append("")

    synthesis = metrics.get("synthesis")
    if synthesis is not None:
        out += ["## Synthesis match (test split)", "", *section_note(synthesis, "synthesis"),
                "Every recipe linked to a test material is scored against every test material by cosine "
                "similarity (recipe text embedding vs the material's embedding). ROC AUC of the true pairs against "
                "all mismatched pairs (random) and against mismatched materials sharing an element with the "
                "recipe's target (hard); 0.5 is chance.", ""]
        rows = [[m, s["recipes"], s["materials"], s["true_pairs"], s["auc_random"], s["auc_hard"],
                 s["hard_negatives"], s["recipe_to_material_recall@1"], s["chance_recall@1"]]
                for m, s in synthesis["by_modality"].items()]
        if rows:
            out += [md_table(["material side", "recipes", "materials", "true pairs", "AUC random", "AUC hard",
                              "hard negatives", "R@1 recipe->material", "chance R@1"], rows), ""]
        if synthesis.get("note"):
            out += [f"Not scored: {synthesis['note']}.", ""]

    baselines = metrics.get("baselines")
    if baselines is not None:
        description = baselines.get("description", "").replace(_OLD_PLACEMENT, "").rstrip()
        if probes is not None:  # the per-target tables of the probe sections carry the baselines' rows
            description += (" They appear in the property and classification tables above, below the CMMA probes."
                             if _has_rows(baselines) else "")
        out += ["## Baselines", "", *section_note(baselines, "baselines"), description.strip(), ""]
        if probes is None:  # no probe tables in this report: the baselines' own tables, target by target
            for kind, header in (("regression", ["model", "input", "MAE", "RMSE", "R²", "n test"]),
                                 ("classification", ["model", "input", "accuracy", "macro F1", "ROC AUC", "n test"])):
                for target in baselines.get(kind, {}):
                    out += [f"### {target}", "", md_table(header, target_rows(metrics, kind, target)), ""]
        rows = verdict_rows(metrics, "regression")
        if rows:
            out += ["CMMA against the baselines, property by property (test MAE; lower is better). The verdict "
                    "compares two models fixed in advance, the CMMA MLP probe on the unified embedding and "
                    "intermediate fusion, which both see every modality:", "",
                    md_table(["property", "dummy (mean)", "dummy (median)", "CMMA ridge (unified)", "CMMA MLP (unified)",
                              "best supervised single-modality", "intermediate fusion", "late fusion", "verdict"],
                             rows), ""]
        rows = verdict_rows(metrics, "classification")
        if rows:
            out += ["The same for the classification tasks (test macro F1; higher is better; the verdict again "
                    "compares the CMMA MLP probe on the unified embedding with intermediate fusion):", "",
                    md_table(["task", "dummy (majority)", "CMMA logistic (unified)", "CMMA MLP (unified)",
                              "best supervised single-modality", "intermediate fusion", "late fusion", "verdict"],
                             rows), ""]
        if baselines.get("skipped"):
            out += ["Baselines not run: " + "; ".join(f"{s['baseline']} for {s['target']} ({s['reason']})"
                                                      for s in baselines["skipped"]) + ".", ""]
        if baselines.get("note"):
            out += [baselines["note"], ""]

    latent = metrics.get("latent")
    if latent is not None:
        out += ["## Latent space", "", *section_note(latent, "latent")]
        out += [latent.get("description", ""), ""]
        for fig in latent.get("figures", []):
            out += [f"![{fig}](figures/{fig})", ""]
        if latent.get("coordinates"):
            out += [f"The maps' coordinates: `figures/{latent['coordinates']}` (material_id, method, x, y).", ""]
        if latent.get("purity"):
            out += ["Neighbourhood purity (share of each test material's "
                    f"{latent.get('purity_k')} nearest test neighbours with the same crystal system):", "",
                    md_table(["embedding", "purity (share)", "chance (share)", "n (materials)"],
                             [[t, s["purity"], s["chance"], s["n"]] for t, s in latent["purity"].items()]), ""]
        interp = latent.get("interpolation")
        if interp:
            out += [f"Interpolation from **{interp['start']['material_id']}** ({interp['start']['formula']}) to "
                    f"**{interp['end']['material_id']}** ({interp['end']['formula']}), spherical, over all "
                    "materials' unified embeddings (nearest three at each point):", ""]
            out += [md_table(["t", "nearest materials (cosine)"],
                             [[p["t"], ", ".join(f"{n['material_id']} {n['formula']} ({n['similarity']:.2f})"
                                                 for n in p["nearest"])] for p in interp["path"]]), ""]
        if latent.get("note"):
            out += [latent["note"], ""]

    explain = metrics.get("explain")
    if explain is not None:
        out += ["## What drives the similarity", "", *section_note(explain, "explain"), explain.get("description", ""), ""]
        for ex in explain.get("examples", []):
            out += render_explanation(ex)
        if explain.get("note"):
            out += [explain["note"], ""]
    return "\n".join(out).rstrip() + "\n"


def describe_pair(pair: dict[str, Any], markdown: bool = True) -> list[str]:
    """Each side's attribution of an explained pair record in its modality's words (markdown paragraphs, or
    terminal lines); the pair is ``<anchor>-<other>``."""
    from cmma_cli.modalities import get_modality

    anchor = pair["pair"][: -len(pair["other"]) - 1]
    return [line for m in (anchor, pair["other"]) for line in get_modality(m).attribution_text(pair, markdown)]


def render_explanation(ex: dict[str, Any], figure_prefix: str = "figures/") -> list[str]:
    """Markdown lines for one material's attribution: each pair's similarity, each side's attribution in the
    words of its modality (:meth:`~cmma_cli.modalities.base.Modality.attribution_text`), its figure."""
    out = [f"### {ex['material_id']} ({ex['formula']})", ""]
    for pair in ex["pairs"]:
        out.append(f"**{pair['pair']}**: cosine similarity {pair['similarity']:.3f}.")
        out.append("")
        out += describe_pair(pair)
        if pair.get("figure"):
            out += [f"![{pair['figure']}]({figure_prefix}{pair['figure']})", ""]
    return out


# --------------------------------------------------------------------------------------------- terminal


def _name_column(table: Table, header: str, names: Any) -> None:
    """A first column of names (properties, tasks, pairs) that is never cut: as wide as the longest name; the
    number columns beside it wrap or shrink first."""
    widest = max([len(header), *(len(str(n)) for n in names)])
    table.add_column(header, justify="left", min_width=widest, no_wrap=True, overflow="fold")


def print_summary(metrics: dict[str, Any], report_path: str) -> None:
    """Compact rich tables of the headline numbers (probes, retrieval, synthesis) on the console."""
    ks = metrics["run"]["ks"]
    probes = metrics.get("probes")
    if probes and probes["regression"]:
        table = Table(title="Property probes on the test split: MAE (R²)", title_justify="left")
        _name_column(table, "property", probes["regression"])
        for col in ("n", "dummy mean / median", "CMMA ridge, unified", "best CMMA probe", "best supervised baseline"):
            table.add_column(col, justify="right", overflow="fold")
        baselines = metrics.get("baselines", {}).get("regression", {})
        for prop, by_table in probes["regression"].items():
            first = next(iter(by_table.values()))
            uni = by_table.get("unified", {}).get("ridge")
            probes_all = [(s[m], f"{m} {t}") for t, s in by_table.items() for m in ("ridge", "mlp")]
            best_probe = min(probes_all, key=lambda p: p[0]["mae"])
            median = first.get("dummy_median", {}).get("mae")
            cells = [prop, str(first["n_test"]), fmt(first["dummy"]["mae"]) + (f" / {fmt(median)}" if median is not None else ""),
                     f"{fmt(uni['mae'])} ({fmt(uni['r2'], 2)})" if uni else "-",
                     f"{fmt(best_probe[0]['mae'])} ({fmt(best_probe[0]['r2'], 2)}) {best_probe[1]}"]
            if baselines.get(prop):
                name, s = min(baselines[prop].items(), key=lambda kv: kv[1]["mae"])
                cells.append(f"{fmt(s['mae'])} ({fmt(s['r2'], 2)}) {name}")
            else:
                cells.append("-")
            table.add_row(*(esc(c) for c in cells))  # property names come from the user's tables
        console.print(table)
    if probes and probes["classification"]:
        table = Table(title="Classification probes on the test split (logistic, unified: accuracy / macro F1 / AUC)",
                      title_justify="left")
        _name_column(table, "task", probes["classification"])
        for col in ("majority acc", "accuracy", "macro F1", "ROC AUC", "n", "best supervised (F1)"):
            table.add_column(col, justify="right", overflow="fold")
        baselines = metrics.get("baselines", {}).get("classification", {})
        for task, by_table in probes["classification"].items():
            s = by_table.get("unified") or next(iter(by_table.values()))
            best = "-"
            if baselines.get(task):
                name, b = max(baselines[task].items(), key=lambda kv: kv[1]["macro_f1"])
                best = f"{fmt(b['macro_f1'])} {name}"
            table.add_row(esc(task), fmt(s["dummy"]["accuracy"]), fmt(s["logistic"]["accuracy"]),
                          fmt(s["logistic"]["macro_f1"]), fmt(s["logistic"]["roc_auc"]), str(s["n_test"]), best)
        console.print(table)
    retrieval = metrics.get("retrieval")
    if retrieval and retrieval["pairs"]:
        table = Table(title="Cross-modal retrieval on the test split (value / chance)", title_justify="left")
        _name_column(table, "pair", retrieval["pairs"])
        table.add_column("n", justify="right")
        for k in ks:
            table.add_column(f"R@{k}", justify="right", overflow="fold")
        table.add_column("MRR", justify="right", overflow="fold")
        table.add_column("median rank", justify="right", overflow="fold")
        for pair, s in retrieval["pairs"].items():
            table.add_row(esc(pair), str(s["queries"]), *(f"{s[f'recall@{k}']:.3f} / {s[f'chance_recall@{k}']:.3f}" for k in ks),
                          f"{s['mrr']:.3f} / {s['chance_mrr']:.3f}", f"{s['median_rank']:.0f} / {s['chance_median_rank']:.0f}")
        console.print(table)
    synthesis = metrics.get("synthesis")
    if synthesis and synthesis["by_modality"]:
        table = Table(title="Synthesis match on the test split (ROC AUC; 0.5 is chance)", title_justify="left")
        _name_column(table, "material side", synthesis["by_modality"])
        for col in ("recipes", "true pairs", "AUC random", "AUC hard"):
            table.add_column(col, justify="right", overflow="fold")
        for m, s in synthesis["by_modality"].items():
            table.add_row(esc(m), str(s["recipes"]), str(s["true_pairs"]), fmt(s["auc_random"]), fmt(s["auc_hard"]))
        console.print(table)
    latent = metrics.get("latent")
    if latent and latent.get("purity"):
        parts = ", ".join(f"{t} {s['purity']:.3f} (chance {s['chance']:.3f})" for t, s in latent["purity"].items())
        console.print(f"Crystal-system neighbourhood purity: {parts}.", highlight=False)
    console.print(esc(f"Report: {report_path}"), highlight=False)
