"""``cmma recommend``: precursor sets and conditions for a target, from the nearest known syntheses.

The literature-similarity idea of He et al. (2023), without their learned encoder: the known recipes' targets
are compared with the target by composition (:mod:`cmma_cli.composition`); each of the nearest recipes proposes
its precursor set, carried over to the target by element substitution (a neighbour's element the target lacks
is replaced, in the precursor's formula, by the target's element it most resembles; the substituted precursor is
kept only when some known recipe uses it), and completed with the most common precursor of any target element
still unsourced. Equal sets proposed by several neighbours add up their similarities. Each proposal keeps the
recipes it came from (DOI, reaction, operations with temperatures, times and atmospheres) as its evidence.

Two baselines live here too, for ``benchmarks/synthesis.py``: the popularity set (each target element's most
common precursor) and plain nearest neighbours (the neighbours' precursor sets, verbatim).
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from cmma_cli.composition import (ELEMENTS, INDEX, ElementEmbeddings, composition_vectors, formula_key, fraction_matrix,
                                  key_of, material_fractions, parse_formula)
from cmma_cli.errors import CMMAError

#: Elements a solid-state precursor set need not supply on its own (air, carbonates, ammonium, water).
AMBIENT = frozenset({"O", "H", "C", "N"})
_YEAR = re.compile(r"[./]((?:19[6-9]|20[0-4])\d)[./]")


def year_of(doi: str | None) -> int | None:
    """The year a DOI carries (``10.1016/j.materresbull.2007.07.027`` -> 2007), or None."""
    m = _YEAR.search(doi or "")
    return int(m.group(1)) if m else None


def sourced(elements: Iterable[str]) -> frozenset[str]:
    """The elements precursors must supply: all but O, H, C, N (unless the target has nothing else)."""
    els = frozenset(elements)
    return (els - AMBIENT) or els


def _temperature_c(entry: Mapping[str, Any]) -> float | None:
    vals = [v for v in (entry.get("values") or []) if isinstance(v, (int, float))]
    if entry.get("max_value") is not None:
        vals.append(entry["max_value"])
    if not vals:
        return None
    t = float(max(vals))
    if str(entry.get("units", "C")).upper().startswith("K"):
        t -= 273.15
    return t if 100.0 <= t <= 3000.0 else None


def operations(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A recipe's operations, each as {type, token, temperatures_c, times_h, atmospheres, media}."""
    out = []
    for op in record.get("operations") or []:
        cond = op.get("conditions") or {}
        temps = [t for t in (_temperature_c(e) for e in cond.get("heating_temperature") or []) if t is not None]
        times = []
        for e in cond.get("heating_time") or []:
            vals = [v for v in (e.get("values") or []) if isinstance(v, (int, float))]
            if vals:
                unit = str(e.get("units", "h")).lower()
                scale = {"min": 1 / 60, "s": 1 / 3600, "day": 24, "days": 24, "d": 24}.get(unit, 1.0)
                times.append(round(max(vals) * scale, 3))
        out.append({
            "type": op.get("type"), "token": op.get("token"), "temperatures_c": temps, "times_h": times,
            "atmospheres": [str(a) for a in cond.get("heating_atmosphere") or []],
            "media": [str(a) for a in cond.get("mixing_media") or []],
        })
    return out


def max_temperature(ops: list[dict[str, Any]]) -> float | None:
    temps = [t for op in ops if op["type"] == "HeatingOperation" for t in op["temperatures_c"]]
    return max(temps) if temps else None


@dataclass
class Recipe:
    recipe_id: str
    doi: str | None
    target_formula: str
    target_key: str
    fractions: dict[str, float]
    precursors: list[str]  # as written
    precursor_keys: frozenset[str]
    reaction_string: str | None
    ops: list[dict[str, Any]]
    max_temp_c: float | None
    year: int | None

    def evidence(self, similarity: float | None = None) -> dict[str, Any]:
        out = {"recipe_id": self.recipe_id, "doi": self.doi, "target": self.target_formula,
               "precursors": self.precursors, "reaction": self.reaction_string,
               "max_temperature_c": self.max_temp_c,
               "operations": [op for op in self.ops if op["temperatures_c"] or op["times_h"] or op["atmospheres"]
                              or op["type"] in {"HeatingOperation", "MixingOperation"}]}
        if similarity is not None:
            out["similarity"] = round(float(similarity), 4)
        return out


@dataclass
class RecipeBook:
    """Known recipes with a fixed target composition and at least one precursor, ready to search."""

    recipes: list[Recipe]
    counts: dict[str, int] = field(default_factory=dict)
    embeddings: ElementEmbeddings | None = None

    def __post_init__(self) -> None:
        self.fractions = fraction_matrix([r.fractions for r in self.recipes]) if self.recipes else \
            np.zeros((0, len(ELEMENTS)), dtype=np.float32)
        self.vectors = composition_vectors(self.fractions, self.embeddings)
        self.precursor_pool: set[str] = {k for r in self.recipes for k in r.precursor_keys}
        # a precursor's display name: its most common spelling
        spellings: dict[str, Counter] = defaultdict(Counter)
        for r in self.recipes:
            for p in r.precursors:
                spellings[formula_key(p)][p] += 1
        self.spelling = {k: c.most_common(1)[0][0] for k, c in spellings.items()}
        # per element, how often each precursor supplies it
        self.by_element: dict[str, Counter] = defaultdict(Counter)
        for r in self.recipes:
            need = sourced(r.fractions)
            for k in r.precursor_keys:
                for el in precursor_elements(k) & need:
                    self.by_element[el][k] += 1
        temps = [r.max_temp_c for r in self.recipes if r.max_temp_c is not None]
        self.median_temp = float(np.median(temps)) if temps else None

    # --- building -----------------------------------------------------------------------------------------
    @classmethod
    def from_records(cls, records: Iterable[Any], embeddings: ElementEmbeddings | None = None) -> "RecipeBook":
        from cmma_cli.sources.recipes import precursor_formulas, recipe_id, target_formula

        recipes, seen = [], set()
        counts = Counter()
        for rec in records:
            if isinstance(rec, str):
                rec = json.loads(rec)
            if not isinstance(rec, dict):
                counts["not_a_recipe"] += 1
                continue
            rid = recipe_id(rec)
            if rid in seen:
                continue
            seen.add(rid)
            counts["read"] += 1
            fr = material_fractions(rec.get("target"))
            if fr is None:
                counts["variable_target"] += 1  # no nominal composition: counted and left out
                continue
            precursors = precursor_formulas(rec)
            if not precursors:
                counts["no_precursors"] += 1
                continue
            ops = operations(rec)
            recipes.append(Recipe(
                recipe_id=rid, doi=rec.get("doi"), target_formula=target_formula(rec) or key_of(fr),
                target_key=key_of(fr), fractions=fr, precursors=precursors,
                precursor_keys=frozenset(formula_key(p) for p in precursors),
                reaction_string=rec.get("reaction_string"), ops=ops, max_temp_c=max_temperature(ops),
                year=year_of(rec.get("doi"))))
        counts["usable"] = len(recipes)
        return cls(recipes, dict(counts), embeddings)

    def subset(self, keep: Iterable[int]) -> "RecipeBook":
        return RecipeBook([self.recipes[i] for i in keep], dict(self.counts), self.embeddings)

    def __len__(self) -> int:
        return len(self.recipes)

    # --- search ---------------------------------------------------------------------------------------------
    def query_vector(self, fractions: Mapping[str, float]) -> np.ndarray:
        return composition_vectors(fraction_matrix([fractions]), self.embeddings)[0]

    def neighbours(self, fractions: Mapping[str, float], k: int) -> list[tuple[int, float, float]]:
        """The ``k`` recipes whose targets are most similar, best first, as (row, score, cosine): the score is the
        cosine of the composition vectors plus half the Jaccard overlap of the elements precursors must supply."""
        if not self.recipes:
            return []
        sim = self.vectors @ self.query_vector(fractions)
        want = sourced(fractions)
        mask = np.zeros(len(ELEMENTS), dtype=np.float32)
        for el in want:
            mask[INDEX[el]] = 1
        present = (self.fractions > 0).astype(np.float32)
        n_els = np.maximum(present @ _sourced_mask(), 1)
        shared = present @ mask
        jaccard = shared / (n_els + len(want) - shared)
        score = sim + 0.5 * jaccard
        k = min(k, len(score))
        idx = np.argpartition(-score, k - 1)[:k]
        idx = idx[np.argsort(-score[idx], kind="stable")]
        return [(int(i), float(score[i]), float(sim[i])) for i in idx]

    def popular(self, element: str, exclude: set[str] = frozenset()) -> str | None:
        """The precursor that most often supplies ``element``."""
        for k, _ in self.by_element.get(element, Counter()).most_common():
            if k not in exclude:
                return k
        return None

    def popularity_set(self, fractions: Mapping[str, float]) -> frozenset[str] | None:
        """Baseline: each sourced target element's most common precursor (None if one has none)."""
        out = set()
        for el in sourced(fractions):
            p = self.popular(el)
            if p is None:
                return None
            out.add(p)
        return frozenset(out)

    def substitute(self, recipe: Recipe, fractions: Mapping[str, float]) -> frozenset[str] | None:
        """``recipe``'s precursor set carried over to the target: substitution, pruning, completion."""
        want = sourced(fractions)
        have = sourced(recipe.fractions)
        extra = sorted(have - want, key=lambda e: INDEX[e])
        missing = set(want - have)
        mapping: dict[str, str] = {}
        for a in extra:
            if not missing:
                break
            b = max(missing, key=lambda b: element_similarity(a, b, self.embeddings))
            mapping[a] = b
            missing.discard(b)
        out: set[str] = set()
        for key in recipe.precursor_keys:
            els = precursor_elements(key)
            if any(e in mapping for e in els):
                new = formula_key(_replace_elements(key, mapping))
                if new not in self.precursor_pool:
                    continue
                key, els = new, precursor_elements(new)
            if (els & sourced(els)) - want - AMBIENT:
                continue  # brings an element the target lacks (additives of O, H, C, N only are kept)
            out.add(key)
        covered = set().union(*(precursor_elements(k) for k in out)) if out else set()
        for el in sorted(want - covered, key=lambda e: INDEX[e]):
            p = self.popular(el)
            if p is None:
                return None
            if precursor_elements(p) & sourced(precursor_elements(p)) - want - AMBIENT:
                continue
            out.add(p)
        covered = set().union(*(precursor_elements(k) for k in out)) if out else set()
        return frozenset(out) if want <= covered else None

    def propose(self, fractions: Mapping[str, float], k: int = 10, neighbours: int = 40,
                substitute: bool = True, power: float = 4.0) -> list[dict[str, Any]]:
        """Ranked precursor sets: {precursors (keys), score, evidence [(recipe index, similarity)]}."""
        scores: dict[frozenset[str], float] = defaultdict(float)
        evidence: dict[frozenset[str], list[tuple[int, float]]] = defaultdict(list)
        for i, score, cosine in self.neighbours(fractions, neighbours):
            r = self.recipes[i]
            cand = self.substitute(r, fractions) if substitute else r.precursor_keys
            if not cand:
                continue
            scores[cand] += max(score, 0.0) ** power
            evidence[cand].append((i, cosine))
        if substitute:
            pop = self.popularity_set(fractions)
            if pop and pop not in scores:
                scores[pop] = 1e-9
                evidence[pop] = []
        ranked = sorted(scores, key=lambda s: -scores[s])[:k]
        total = sum(scores.values()) or 1.0
        return [{"precursors": s, "score": scores[s] / total, "evidence": evidence[s]} for s in ranked]

    def proposed_temperature(self, proposal: Mapping[str, Any]) -> float | None:
        temps = [self.recipes[i].max_temp_c for i, _ in proposal["evidence"] if self.recipes[i].max_temp_c is not None]
        return float(np.median(temps)) if temps else self.median_temp


_SOURCED_MASK: np.ndarray | None = None


def _sourced_mask() -> np.ndarray:
    global _SOURCED_MASK
    if _SOURCED_MASK is None:
        _SOURCED_MASK = np.array([0.0 if el in AMBIENT else 1.0 for el in ELEMENTS], dtype=np.float32)
    return _SOURCED_MASK


def precursor_elements(key: str) -> frozenset[str]:
    return frozenset(re.findall(r"[A-Z][a-z]?", key)) & frozenset(INDEX)


def _replace_elements(formula: str, mapping: Mapping[str, str]) -> str:
    return re.sub(r"[A-Z][a-z]?", lambda m: mapping.get(m.group(0), m.group(0)), formula)


def element_similarity(a: str, b: str, embeddings: ElementEmbeddings | None = None) -> float:
    """How alike two elements are: the cosine of their embeddings, else the periodic table (same group first,
    then fewer rows apart)."""
    if embeddings is not None and embeddings.known[INDEX[a]] and embeddings.known[INDEX[b]]:
        u, v = embeddings.matrix[INDEX[a]], embeddings.matrix[INDEX[b]]
        return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v) + 1e-12))
    from pymatgen.core import Element

    ea, eb = Element(a), Element(b)
    same_group = 1.0 if ea.group == eb.group else 0.0
    return same_group - 0.1 * abs(ea.row - eb.row) - 0.02 * abs(ea.group - eb.group)


# --- where recipes come from ----------------------------------------------------------------------------------

def load_book(ws: Any, recipes_file: Path | None, embeddings: ElementEmbeddings | None = None) -> tuple[RecipeBook, str]:
    """The recipes to recommend from: ``recipes_file``, else the workspace's raw/recipes.parquet (every recipe a
    local fetch read), else raw/synthesis.parquet (the recipes linked to a material). Returns (book, where)."""
    if recipes_file is not None:
        from cmma_cli.sources.recipes import read_recipe_file

        path = Path(recipes_file).expanduser()
        if not path.exists():
            raise CMMAError(f"{path} does not exist: give --recipes a JSON / JSON-lines recipe file (plain, .gz or .xz).")
        try:
            records = read_recipe_file(path)
        except Exception as exc:
            raise CMMAError(f"Could not read recipes from {path} ({type(exc).__name__}: {exc}): give a JSON list, "
                            "{\"reactions\": [...]} or JSON lines (plain, .gz or .xz).") from None
        book, where = RecipeBook.from_records(records, embeddings), str(path)
    else:
        import pandas as pd

        book, where = None, ""
        for name in ("recipes.parquet", "synthesis.parquet"):
            path = ws.raw / name
            if path.exists():
                df = pd.read_parquet(path, columns=["record"])
                if len(df):
                    book, where = RecipeBook.from_records(df["record"], embeddings), str(path)
                    break
        if book is None:
            raise CMMAError("No synthesis recipes to recommend from: give --recipes FILE (e.g. the text-mined "
                            "solid-state_dataset_2019-12-03.json.xz), or import them once with `cmma fetch --source "
                            "local STRUCTURES RECIPES.json.xz`.")
    if not len(book):
        raise CMMAError(f"None of the recipes in {where} has a fixed target composition and precursors, so there is "
                        "nothing to recommend from.")
    return book, where


def resolve_target(ws: Any, target: str) -> tuple[dict[str, float], str]:
    """A target given as a CIF file, a workspace material id, or a formula -> (fractions, how it was read)."""
    path = Path(target).expanduser()
    if path.suffix.lower() == ".cif":
        if not path.exists():
            raise CMMAError(f"{path} does not exist: give a CIF file, a formula such as LiFePO4, or a material id.")
        from cmma_cli.sources.structures import parse_cif

        try:
            structure = parse_cif(path.read_text(errors="replace"))
        except ValueError as exc:
            raise CMMAError(f"Could not read the CIF {path} ({exc}): check the file.") from None
        formula = structure.composition.reduced_formula
        return parse_formula(formula), f"{formula} (from {path.name})"
    materials = ws.raw / "materials.parquet" if ws is not None else None
    if materials is not None and materials.exists() and re.match(r"^[\w.-]+-\w+$", target):
        import pandas as pd

        df = pd.read_parquet(materials, columns=["material_id", "formula"])
        hit = df[df["material_id"] == target]
        if len(hit):
            formula = str(hit["formula"].iloc[0])
            return parse_formula(formula), f"{formula} ({target})"
    return parse_formula(target), target.strip()


# --- the command ----------------------------------------------------------------------------------------------

def recommend(book: RecipeBook, fractions: Mapping[str, float], k: int = 5, neighbours: int = 40,
              evidence: int = 3) -> list[dict[str, Any]]:
    """The JSON-able answer: ranked proposals with their precursors (as usually written), score, proposed
    maximum heating temperature, and the recipes they come from."""
    out = []
    for rank, p in enumerate(book.propose(fractions, k=k, neighbours=neighbours), 1):
        t = book.proposed_temperature(p)
        # recipes using exactly this set first, then those it was adapted from (substituted, pruned or completed)
        ev = sorted(p["evidence"], key=lambda e: (-round(e[1], 6), book.recipes[e[0]].precursor_keys != p["precursors"]))
        out.append({
            "rank": rank,
            "precursors": sorted(book.spelling.get(x, x) for x in p["precursors"]),
            "score": round(p["score"], 4),
            "max_temperature_c": None if t is None else round(t),
            "from": "nearest recipes" if p["evidence"] else "most common precursor per element",
            "evidence": [{**book.recipes[i].evidence(s), "adapted": book.recipes[i].precursor_keys != p["precursors"]}
                         for i, s in ev[:evidence]],
        })
    return out


def score_recipe(book: RecipeBook, fractions: Mapping[str, float], precursors: list[str], neighbours: int = 40,
                 evidence: int = 5) -> dict[str, Any]:
    """How well a precursor set fits a target: its share of the neighbour vote (the recommender's score), its rank
    among the proposals, which target elements it leaves unsourced or which elements it adds, which precursors no
    known recipe uses, and the nearest known recipes (those using this very set first) as evidence."""
    keys = frozenset(formula_key(p) for p in precursors)
    proposals = book.propose(fractions, k=10_000, neighbours=neighbours)
    rank = next((i for i, p in enumerate(proposals, 1) if p["precursors"] == keys), None)
    share = proposals[rank - 1]["score"] if rank else 0.0
    want = sourced(fractions)
    covered = set().union(*(precursor_elements(k) for k in keys)) if keys else set()
    same_set = [i for i, r in enumerate(book.recipes) if r.precursor_keys == keys]
    near = [(i, cosine) for i, _, cosine in book.neighbours(fractions, neighbours)]
    if same_set:
        qv = book.query_vector(fractions)
        same = sorted(((i, float(book.vectors[i] @ qv)) for i in same_set), key=lambda t: -t[1])[:evidence]
    else:
        same = []
    return {
        "precursors": sorted(precursors),
        "rank": rank,
        "of": len(proposals),
        "score": round(share, 4),
        "top_proposal": sorted(book.spelling.get(x, x) for x in proposals[0]["precursors"]) if proposals else None,
        "unsourced_elements": sorted(want - covered, key=lambda e: INDEX[e]),
        "foreign_elements": sorted(covered - want - AMBIENT, key=lambda e: INDEX[e]),
        "unknown_precursors": sorted(p for p in precursors if formula_key(p) not in book.precursor_pool),
        "recipes_with_this_set": len(same_set),
        "evidence_same_set": [book.recipes[i].evidence(s) for i, s in same],
        "evidence_nearest": [book.recipes[i].evidence(s) for i, s in near[:evidence]],
    }


def read_score_recipe(path: Path) -> tuple[list[str], str | None]:
    """The precursors of a recipe file (one recipe in the text-mined layout, ``{"precursors": [...]}`` or a list
    of formulas) and its target formula if it names one."""
    from cmma_cli.sources.recipes import precursor_formulas, target_formula

    path = Path(path).expanduser()
    if not path.exists():
        raise CMMAError(f"{path} does not exist: give --score a JSON recipe ({{\"precursors\": [\"Li2CO3\", ...]}}).")
    try:
        data = json.loads(path.read_text())
    except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested deeper than Python parses
        raise CMMAError(f"{path} is not JSON ({type(exc).__name__}): give --score a JSON recipe ({{\"precursors\": [...]}}).") from None
    if isinstance(data, dict) and isinstance(data.get("reactions"), list) and data["reactions"]:
        data = data["reactions"][0]
    if isinstance(data, list) and all(isinstance(x, str) for x in data):
        return list(data), None
    if isinstance(data, dict):
        precursors = precursor_formulas(data)
        if precursors:
            return precursors, target_formula(data) if data.get("target") else None
    raise CMMAError(f"{path} names no precursors: give {{\"precursors\": [\"Li2CO3\", \"FeC2O4\", ...]}} or a recipe "
                    "in the text-mined layout.")


def run_recommend(ws: Any, target: str | None, cfg: Any, recipes_file: Path | None = None,
                  score: Path | None = None, as_json: bool = False) -> dict[str, Any]:
    from cmma_cli.console import console, esc

    embeddings = ElementEmbeddings.load(cfg.element_embeddings) if cfg.element_embeddings else None
    given = None
    if score is not None:
        given, recipe_target = read_score_recipe(score)
        target = target or recipe_target
    if not target:
        raise CMMAError("Name the target: `cmma recommend LiFePO4`, a CIF file or a material id (with --score, "
                        "--target X).")
    fractions, label = resolve_target(ws, target)
    book, where = load_book(ws, recipes_file, embeddings)
    if given is not None:
        result = {"target": label, "recipes_from": where, **score_recipe(book, fractions, given, cfg.neighbours)}
        if as_json:
            print(json.dumps(result, indent=1, default=str))
        else:
            _print_score(console, esc, result)
        return result
    proposals = recommend(book, fractions, k=cfg.k, neighbours=cfg.neighbours, evidence=cfg.evidence)
    result = {"target": label, "recipes_from": where, "recipes_used": len(book), "counts": book.counts,
              "proposals": proposals}
    if as_json:
        print(json.dumps(result, indent=1, default=str))
    else:
        _print_proposals(console, esc, result)
    return result


def _conditions(ev: Mapping[str, Any]) -> str:
    parts = []
    for op in ev["operations"]:
        if op["type"] != "HeatingOperation" or not (op["temperatures_c"] or op["times_h"]):
            continue
        bit = "/".join(f"{t:.0f} °C" for t in op["temperatures_c"])
        if op["times_h"]:
            bit += (" " if bit else "") + "/".join(f"{h:g} h" for h in op["times_h"])
        if op["atmospheres"]:
            bit += " in " + ", ".join(op["atmospheres"])
        parts.append(bit)
    return "; ".join(parts) or "no heating conditions recorded"


def _print_proposals(console: Any, esc: Any, result: Mapping[str, Any]) -> None:
    console.print(esc(f"Precursor sets for {result['target']} (from {result['recipes_used']:,} recipes in "
                      f"{result['recipes_from']}):"), highlight=False)
    for p in result["proposals"]:
        t = f", heat to ~{p['max_temperature_c']} °C" if p["max_temperature_c"] is not None else ""
        console.print(esc(f"{p['rank']}. {' + '.join(p['precursors'])}   score {p['score']:.2f}{t}  [{p['from']}]"),
                      highlight=False)
        for ev in p["evidence"]:
            how = f" (adapted from {' + '.join(ev['precursors'])})" if ev["adapted"] else ""
            console.print(esc(f"     {ev['target']} (similarity {ev['similarity']:.2f}) doi:{ev['doi']}{how}"), highlight=False)
            if ev["reaction"]:
                console.print(esc(f"       {ev['reaction']}"), highlight=False)
            console.print(esc(f"       {_conditions(ev)}"), highlight=False)


def _print_score(console: Any, esc: Any, r: Mapping[str, Any]) -> None:
    place = f"rank {r['rank']} of {r['of']} proposals" if r["rank"] else "not among the proposals"
    console.print(esc(f"{' + '.join(r['precursors'])} for {r['target']}: {place}, score {r['score']:.2f} "
                      f"(the top proposal is {' + '.join(r['top_proposal'] or [])})."), highlight=False)
    if r["unsourced_elements"]:
        console.print(esc(f"  No precursor supplies {', '.join(r['unsourced_elements'])}."), highlight=False)
    if r["foreign_elements"]:
        console.print(esc(f"  The precursors bring {', '.join(r['foreign_elements'])}, which the target lacks."), highlight=False)
    if r["unknown_precursors"]:
        console.print(esc(f"  No known recipe uses {', '.join(r['unknown_precursors'])}."), highlight=False)
    console.print(esc(f"  Known recipes using exactly this set: {r['recipes_with_this_set']}."), highlight=False)
    for title, key in (("Nearest with this set", "evidence_same_set"), ("Nearest known recipes", "evidence_nearest")):
        if r[key]:
            console.print(esc(f"  {title}:"), highlight=False)
            for ev in r[key]:
                console.print(esc(f"     {ev['target']} (similarity {ev['similarity']:.2f}) doi:{ev['doi']}: "
                                  f"{' + '.join(ev['precursors'])}"), highlight=False)
