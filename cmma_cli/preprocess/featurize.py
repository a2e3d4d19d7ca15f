"""Per-material work, run in worker processes: raw structure JSON -> every modality's processed columns.

:func:`featurize` never raises for bad input: a structure that cannot be used comes back with a reject
reason instead, so one broken entry costs one row, not the run. It parses the structure once (and applies
the size caps: sites, cell volume, XRD reflections), then asks each registered modality, in registry order, for its columns
(:meth:`~cmma_cli.modalities.base.Modality.featurize`). A worker process is set up once
(:func:`init_worker`) with the config and the modalities, then handles whole chunks (:func:`featurize_chunk`),
so only structure strings go in and arrays come out.
"""

from __future__ import annotations

import json
import math
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


def _diffraction_settings(cfg: Any) -> list[tuple[float, float]]:
    """``(wavelength in Angstrom, largest 2-theta in degrees)`` of every enabled modality section that computes a
    diffraction pattern from the structure (one with ``wavelength`` and ``two_theta_max`` settings)."""
    out = []
    for section in (getattr(cfg, "settings", None) or {}).values():
        if not (hasattr(section, "wavelength") and hasattr(section, "two_theta_max")):
            continue
        if not getattr(section, "enabled", True):
            continue
        wavelength = section.wavelength
        if isinstance(wavelength, str):
            from pymatgen.analysis.diffraction.xrd import WAVELENGTHS

            wavelength = WAVELENGTHS.get(wavelength)
        try:
            wavelength = float(wavelength)
        except (TypeError, ValueError):
            continue
        if wavelength > 0:
            out.append((wavelength, float(section.two_theta_max)))
    return out


def reflections_estimate(volume: float, wavelength: float, two_theta_max: float) -> float:
    """About how many reciprocal-lattice points a powder pattern up to ``two_theta_max`` (degrees) visits for a
    cell of ``volume`` (cubic Angstrom): the points in the sphere of radius 2 sin(theta_max) / wavelength, each
    taking 1/V of reciprocal space: (4 pi / 3) (2 sin(theta_max) / wavelength)^3 V."""
    radius = 2.0 * math.sin(math.radians(min(two_theta_max, 180.0) / 2.0)) / wavelength
    return 4.0 * math.pi / 3.0 * radius**3 * volume


def check_size(structure: Any, cfg: Any) -> None:
    """``StructureUnusable`` when the structure is too big to featurize safely (site count, cell volume, the
    reflections its computed XRD pattern would need): estimated before any work, so one absurd CIF (a 1000 A
    cell, a ten-thousand-site supercell) costs one reject instead of the machine's memory or an hour."""
    sites = len(structure)
    max_sites = getattr(cfg, "max_sites", None)
    if max_sites is not None and sites > max_sites:
        raise StructureUnusable(f"{sites} sites, more than the cap of {max_sites} (raise --max-sites to keep it)")
    volume = float(structure.volume)
    max_volume = getattr(cfg, "max_volume", None)
    if max_volume is not None and volume > max_volume:
        raise StructureUnusable(f"cell volume {volume:,.0f} A^3, more than the cap of {max_volume:,.0f} A^3 "
                                "(raise --max-volume to keep it)")
    max_reflections = getattr(cfg, "max_reflections", None)
    if max_reflections is not None:
        for wavelength, two_theta_max in _diffraction_settings(cfg):
            need = reflections_estimate(volume, wavelength, two_theta_max)
            if need > max_reflections:
                raise StructureUnusable(
                    f"its XRD pattern would need about {need:,.0f} reflections (cell volume {volume:,.0f} A^3), more "
                    f"than the cap of {max_reflections:,} (raise --max-reflections, or lower --two-theta-max)")


def featurize(material_id: str, structure_json: Any, linked: dict[str, Any], cfg: Any,
              modalities: list[Modality], has_structure: bool = True) -> Featurized:
    """Every modality's columns for one material (``linked``: what each modality's gather found for it).
    ``has_structure=False``: a row that never has one (a recipe row), so its absence is no reject."""
    structure = None
    rejects: list[tuple[str, str, str]] = []
    try:
        if has_structure:
            structure = parse_structure(structure_json)
            check_size(structure, cfg)
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
    """Process initializer: keep the config and the modalities for every chunk this worker gets; end with the
    command that started the pool (a killed ``cmma preprocess`` leaves no featurizer behind)."""
    from cmma_cli.processes import die_with_starter

    die_with_starter()
    global _CFG, _MODALITIES
    _CFG, _MODALITIES = cfg, modalities
    warnings.filterwarnings("ignore")  # pymatgen's structure warnings would flood the terminal


def featurize_chunk(items: list[tuple[str, Any, dict[str, Any]]]) -> list[Featurized]:
    """Featurize ``(material_id, structure_json, linked)`` items with this worker's config."""
    if _CFG is None:
        raise RuntimeError("featurize_chunk called in a process that init_worker did not set up")
    return [featurize(mid, text, linked, _CFG, _MODALITIES) for mid, text, linked in items]
