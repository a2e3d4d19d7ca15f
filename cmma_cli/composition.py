"""Composition: a material as elements and their fractions, the view every source has.

A structure, a recipe's target or precursor, and a formula typed by a user all reduce to the same thing here:
``{element: fraction}`` with fractions summing to one. From it come

- :func:`fraction_vector`: one number per element (Z = 1..103), the fractions themselves. It does not depend
  on the order the elements are written in, nor on the formula's scale (``Li2Fe2P2O8`` is ``LiFePO4``);
- :func:`ElementEmbeddings.embed`: the fraction-weighted mean of pretrained per-element vectors, L2-normalised
  (the Magpie-free "mat2vec" view; matminer ships ``matscholar_els.json`` and ``megnet_elemental_embedding.json``).
  Element embeddings are read from a JSON file ``{symbol: [numbers]}``: the one given, else matminer's copy
  when matminer is installed, else there are none and :func:`fraction_vector` is the composition's vector.

Recipe targets written with variables (``La1-xCaxMnO3``) get their nominal composition from the recipe's own
values of the variables (``amounts_vars``; the first value listed); without values they have no composition.
"""

from __future__ import annotations

import ast
import json
import operator
import re
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cmma_cli.errors import CMMAError

#: The elements a composition vector has a slot for, in order of atomic number (H .. Lr).
ELEMENTS: tuple[str, ...] = (
    "H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se Br Kr Rb Sr Y Zr "
    "Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb Dy Ho Er Tm Yb Lu Hf Ta W Re Os Ir "
    "Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am Cm Bk Cf Es Fm Md No Lr"
).split()
INDEX = {el: i for i, el in enumerate(ELEMENTS)}

Composition = dict  # {element: fraction}, fractions sum to 1


def normalise(amounts: Mapping[str, float]) -> dict[str, float]:
    """``amounts`` as fractions summing to one, zero and negative amounts dropped, sorted by element."""
    positive = {el: float(a) for el, a in amounts.items() if float(a) > 0}
    total = sum(positive.values())
    if total <= 0:
        raise ValueError("a composition needs at least one element with a positive amount")
    return {el: positive[el] / total for el in sorted(positive, key=lambda e: INDEX.get(e, 999))}


def parse_formula(text: str) -> dict[str, float]:
    """A formula (``LiFePO4``, ``Fe2(SO4)3``, ``Li2CO3·H2O``) as fractions; one sentence when it is not one.

    Raises :class:`CMMAError` for an unknown element (``Xx2O3``) or anything that is not a fixed composition
    (``La1-xCaxMnO3``, ``lithium iron phosphate``).
    """
    from pymatgen.core import Composition as PmgComposition

    text = (text or "").strip()
    if not text:
        raise CMMAError("The target is empty: give a formula such as LiFePO4, a CIF file, or a material id.")
    parts = [p for p in re.split(r"[·•∙*]", text) if p.strip()]
    amounts: dict[str, float] = {}
    for part in parts:
        part = part.strip()
        mult = 1.0
        lead = re.match(r"^(\d+(?:\.\d+)?)\s*(?=[A-Z(])", part)
        if lead and len(parts) > 1:  # the 2 of "·2H2O"
            mult, part = float(lead.group(1)), part[lead.end():]
        unknown = [s for s in re.findall(r"[A-Z][a-z]?", part) if s not in INDEX]
        if unknown:
            raise CMMAError(f"{text!r} names an element cmma does not know ({', '.join(sorted(set(unknown)))}): check "
                            "the spelling (elements H to Lr, e.g. LiFePO4).")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                comp = PmgComposition(part)
            els = {str(el): float(a) for el, a in comp.get_el_amt_dict().items()}
        except Exception:
            raise CMMAError(f"{text!r} is not a formula cmma can read: give a fixed composition such as LiFePO4 or "
                            "Li0.5Ca0.5MnO3 (no variables such as x, no names).") from None
        bad = [el for el in els if el not in INDEX]
        if bad:
            raise CMMAError(f"{text!r} names an element cmma does not know ({', '.join(bad)}): check the spelling "
                            "(elements H to Lr, e.g. LiFePO4).")
        for el, a in els.items():
            amounts[el] = amounts.get(el, 0.0) + mult * a
    try:
        return normalise(amounts)
    except ValueError:
        raise CMMAError(f"{text!r} has no atoms: give a formula such as LiFePO4.") from None


@lru_cache(maxsize=None)
def formula_key(text: str) -> str:
    """A canonical name for a formula, equal for equal compositions (``NH4H2PO4`` = ``H6NO4P``): the reduced
    formula of the parsed composition, or the stripped text itself when it does not parse."""
    try:
        return key_of(parse_formula(text))
    except CMMAError:
        return text.strip()


def key_of(fractions: Mapping[str, float]) -> str:
    """The reduced formula of a composition given as fractions (pymatgen's reduced formula)."""
    from pymatgen.core import Composition as PmgComposition

    smallest = min(fractions.values())
    ratios = {el: f / smallest for el, f in fractions.items()}
    for scale in range(1, 13):  # Fe2(SO4)3: 1 : 1.5 : 6 -> 2 : 3 : 12, written with whole numbers where it can be
        if all(abs(r * scale - round(r * scale)) < 1e-3 * max(1.0, r * scale) for r in ratios.values()):
            ratios = {el: round(r * scale) for el, r in ratios.items()}
            break
    else:
        ratios = {el: round(r, 3) for el, r in ratios.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PmgComposition(ratios).reduced_formula


def fraction_vector(fractions: Mapping[str, float]) -> np.ndarray:
    """Element fractions as a vector over :data:`ELEMENTS` (float32); order and scale of the formula do not matter."""
    v = np.zeros(len(ELEMENTS), dtype=np.float32)
    fr = normalise(fractions)
    for el, f in fr.items():
        v[INDEX[el]] = f
    return v


def fraction_matrix(compositions: list[Mapping[str, float]]) -> np.ndarray:
    """:func:`fraction_vector` of each composition, stacked (rows, len(ELEMENTS))."""
    out = np.zeros((len(compositions), len(ELEMENTS)), dtype=np.float32)
    for i, comp in enumerate(compositions):
        for el, f in normalise(comp).items():
            out[i, INDEX[el]] = f
    return out


def matminer_embedding_file(name: str = "matscholar_els.json") -> Path | None:
    """matminer's copy of a pretrained element-embedding file, when matminer is installed."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("matminer")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "utils" / "data_files" / name
    return path if path.exists() else None


class ElementEmbeddings:
    """Pretrained per-element vectors (``{symbol: [numbers]}``) and the composition embedding they give."""

    def __init__(self, table: Mapping[str, Any], name: str = "element embeddings"):
        rows = {el: np.asarray(v, dtype=np.float32) for el, v in table.items() if el in INDEX}
        if not rows:
            raise CMMAError(f"{name} holds no vector for any element symbol: give a JSON file {{\"Li\": [...], ...}}.")
        self.name = name
        self.dim = len(next(iter(rows.values())))
        self.matrix = np.zeros((len(ELEMENTS), self.dim), dtype=np.float32)
        self.known = np.zeros(len(ELEMENTS), dtype=bool)
        for el, v in rows.items():
            self.matrix[INDEX[el]] = v
            self.known[INDEX[el]] = True

    @classmethod
    def load(cls, path: str | Path | None = None) -> "ElementEmbeddings | None":
        """From ``path``, else matminer's ``matscholar_els.json`` if installed, else None."""
        path = Path(path) if path else matminer_embedding_file()
        if path is None:
            return None
        try:
            table = json.loads(Path(path).read_text())
        except (OSError, ValueError, RecursionError) as exc:
            raise CMMAError(f"Could not read element embeddings from {path} ({exc}): give a JSON file "
                            "{\"Li\": [...], ...} such as matminer's matscholar_els.json.") from None
        return cls(table, name=Path(path).name)

    def missing(self, fractions: Mapping[str, float]) -> list[str]:
        """Elements of the composition without an embedding."""
        return [el for el in fractions if not self.known[INDEX[el]]]

    def embed_matrix(self, fractions: np.ndarray) -> np.ndarray:
        """Rows of element fractions (``fraction_matrix``) -> L2-normalised embeddings."""
        e = fractions @ self.matrix
        norm = np.linalg.norm(e, axis=1, keepdims=True)
        return e / np.where(norm > 0, norm, 1.0)

    def embed(self, fractions: Mapping[str, float]) -> np.ndarray:
        """The fraction-weighted mean of the elements' vectors, L2-normalised."""
        return self.embed_matrix(fraction_vector(fractions)[None, :])[0]


def composition_vectors(fractions: np.ndarray, embeddings: ElementEmbeddings | None = None) -> np.ndarray:
    """The vectors compositions are compared by (cosine): the element embedding when given, else the
    L2-normalised fraction vector."""
    if embeddings is not None:
        return embeddings.embed_matrix(fractions)
    norm = np.linalg.norm(fractions, axis=1, keepdims=True)
    return fractions / np.where(norm > 0, norm, 1.0)


# --- recipe records (Materials Project / text-mined layout) ---------------------------------------------------

_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _evaluate(expr: Any, values: Mapping[str, float]) -> float | None:
    """An amount such as ``"5.5-x"`` or ``"1.5*z+26"`` with the variables' values, or None. Only numbers, the
    given variables, + - * / and parentheses are read (the syntax tree is walked, nothing is evaluated as code)."""
    if isinstance(expr, (int, float)):
        return float(expr)
    try:
        tree = ast.parse(str(expr).strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError):
        return None

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return float(node.value)
        if isinstance(node, ast.Name) and node.id in values:
            return float(values[node.id])
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -walk(node.operand) if isinstance(node.op, ast.USub) else walk(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
            return _ARITHMETIC[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError("not an amount")

    try:
        return walk(tree)
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


def material_fractions(material: Mapping[str, Any] | None) -> dict[str, float] | None:
    """The nominal composition of a recipe's material (target or precursor) as fractions, or None when it has
    variables without values, element variables, or no composition at all."""
    if not material:
        return None
    values = {}
    for name, spec in (material.get("amounts_vars") or {}).items():
        listed = (spec or {}).get("values") or []
        if not listed and (spec or {}).get("min_value") is not None:
            listed = [spec["min_value"]]
        if listed:
            values[name] = float(listed[0])
    values.setdefault("del_O", 0.0)  # oxygen deficiency (O3-δ): the nominal composition has none
    element_vars = {}
    for name, listed in (material.get("elements_vars") or {}).items():
        first = next((e for e in listed or [] if e in INDEX), None)
        if first is not None:
            element_vars[name] = first
    amounts: dict[str, float] = {}
    for part in material.get("composition") or []:
        mult = _evaluate(part.get("amount", 1), values)
        if mult is None:
            return None
        for el, a in (part.get("elements") or {}).items():
            el = element_vars.get(el, el)
            if el not in INDEX:
                return None  # an element variable (M, RE) or a typo
            value = _evaluate(a, values)
            if value is None:
                return None
            amounts[el] = amounts.get(el, 0.0) + mult * value
    if not amounts:
        formula = material.get("material_formula") or material.get("material_string")
        if not formula:
            return None
        try:
            return parse_formula(formula)
        except CMMAError:
            return None
    try:
        return normalise(amounts)
    except ValueError:
        return None
