"""Per-material work, run in worker processes: raw structure JSON -> every modality's processed columns.

:func:`featurize` never raises for bad input: a structure that cannot be used comes back with a reject
reason instead, so one broken entry costs one row, not the run. It parses the structure once (and applies
the site cap), then asks each registered modality, in registry order, for its columns
(:meth:`~cmma_cli.modalities.base.Modality.featurize`). A worker process is set up once
(:func:`init_worker`) with the config and the modalities, then handles whole chunks (:func:`featurize_chunk`),
so only structure strings go in and arrays come out.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Any

from cmma_cli.modalities.base import Item, Modality
from cmma_cli.sources.schema import STRUCTURE_COLUMN


class StructureUnusable(ValueError):
    """A raw structure that cannot be read; the message is the reason written to rejects."""


@dataclass
class Featurized:
    """One material's processed columns (``{column: value}``), plus why anything is missing."""

    material_id: str
    values: dict[str, Any] = field(default_factory=dict)
    rejects: list[tuple[str, str, str]] = field(default_factory=list)  # (source, item, reason)


def parse_structure(text: Any):
    """A structure from the raw table's JSON column; ``StructureUnusable`` with the reason otherwise."""
    from pymatgen.core import Structure

    if not isinstance(text, str) or not text.strip():
        raise StructureUnusable("no structure in the raw data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structure = Structure.from_dict(json.loads(text))
    except Exception as exc:  # malformed JSON or a dict pymatgen cannot read
        raise StructureUnusable(f"unreadable structure ({type(exc).__name__}: {str(exc).strip()[:120]})") from exc
    if len(structure) == 0:
        raise StructureUnusable("structure has no sites")
    return structure


def featurize(material_id: str, structure_json: Any, linked: dict[str, Any], cfg: Any,
              modalities: list[Modality]) -> Featurized:
    """Every modality's columns for one material (``linked``: what each modality's gather found for it)."""
    structure = None
    rejects: list[tuple[str, str, str]] = []
    try:
        structure = parse_structure(structure_json)
        if cfg.max_sites is not None and len(structure) > cfg.max_sites:
            raise StructureUnusable(f"{len(structure)} sites, more than the cap of {cfg.max_sites}")
    except StructureUnusable as exc:
        rejects.append((STRUCTURE_COLUMN, material_id, str(exc)))
        structure = None
    item = Item(material_id, structure, linked, rejects)
    values: dict[str, Any] = {}
    for modality in modalities:
        values.update(modality.featurize(item, getattr(cfg, modality.name, None)))
    return Featurized(material_id, values, item.rejects)


_CFG: Any = None
_MODALITIES: list[Modality] = []


def init_worker(cfg: Any, modalities: list[Modality]) -> None:
    """Process initializer: keep the config and the modalities for every chunk this worker gets."""
    global _CFG, _MODALITIES
    _CFG, _MODALITIES = cfg, modalities
    warnings.filterwarnings("ignore")  # pymatgen's structure warnings would flood the terminal


def featurize_chunk(items: list[tuple[str, Any, dict[str, Any]]]) -> list[Featurized]:
    """Featurize ``(material_id, structure_json, linked)`` items with this worker's config."""
    if _CFG is None:
        raise RuntimeError("featurize_chunk called in a process that init_worker did not set up")
    return [featurize(mid, text, linked, _CFG, _MODALITIES) for mid, text, linked in items]
