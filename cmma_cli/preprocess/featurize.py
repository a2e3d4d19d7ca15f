"""Per-structure work, run in worker processes: raw structure JSON -> crystal graph and XRD pattern.

:func:`featurize` never raises for bad input: a structure that cannot be used comes back with a
reject reason instead, so one broken entry costs one row, not the run. A worker process is set up
once (:func:`init_worker`) with the options and one :class:`XRDCalculator`, then handles whole chunks
(:func:`featurize_chunk`), so only structure strings go in and numpy arrays come out.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.analysis.diffraction.xrd import XRDCalculator
from pymatgen.core import Structure

from cmma_cli.preprocess.graphs import CrystalGraph, StructureRejected, build_graph
from cmma_cli.preprocess.spectra import PatternRejected, XRDGrid, computed_pattern, measured_pattern


@dataclass(frozen=True)
class FeaturizeOptions:
    """What a worker needs to know (a picklable slice of the preprocess config)."""

    cutoff: float = 5.0
    max_neighbors: int | None = None
    min_distance: float = 0.5
    max_sites: int | None = None
    xrd: bool = True
    grid: XRDGrid = field(default_factory=XRDGrid)


@dataclass
class Featurized:
    """One material's structure-derived columns, plus why anything is missing."""

    material_id: str
    graph: CrystalGraph | None = None
    xrd: np.ndarray | None = None
    xrd_source: str | None = None
    rejects: list[tuple[str, str, str]] = field(default_factory=list)  # (source, item, reason)


def parse_structure(text: Any) -> Structure:
    """A structure from the raw table's JSON column; ``StructureRejected`` with the reason otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise StructureRejected("no structure in the raw data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structure = Structure.from_dict(json.loads(text))
    except Exception as exc:  # malformed JSON or a dict pymatgen cannot read
        raise StructureRejected(f"unreadable structure ({type(exc).__name__}: {str(exc).strip()[:120]})") from exc
    if len(structure) == 0:
        raise StructureRejected("structure has no sites")
    return structure


def featurize(
    material_id: str,
    structure_json: Any,
    measured: str | None,
    options: FeaturizeOptions,
    calculator: XRDCalculator | None = None,
) -> Featurized:
    """Graph and XRD for one material (a measured pattern, when given and readable, wins over a computed one)."""
    out = Featurized(material_id=material_id)
    if measured is not None:
        try:
            out.xrd, out.xrd_source = measured_pattern(Path(measured), options.grid), "measured"
        except (PatternRejected, OSError, UnicodeError) as exc:
            out.rejects.append(("measured_xrd", measured, str(exc)))
    try:
        structure = parse_structure(structure_json)
        if options.max_sites is not None and len(structure) > options.max_sites:
            raise StructureRejected(f"{len(structure)} sites, more than the cap of {options.max_sites}")
        out.graph = build_graph(structure, options.cutoff, options.max_neighbors, options.min_distance)
    except StructureRejected as exc:
        out.rejects.append(("structure", material_id, str(exc)))
        return out
    if options.xrd and out.xrd is None:
        try:
            out.xrd, out.xrd_source = computed_pattern(structure, options.grid, calculator), "computed"
        except PatternRejected as exc:
            out.rejects.append(("xrd", material_id, str(exc)))
    return out


_OPTIONS: FeaturizeOptions | None = None
_CALCULATOR: XRDCalculator | None = None


def init_worker(options: FeaturizeOptions) -> None:
    """Process initializer: keep the options and one XRD calculator for every chunk this worker gets."""
    global _OPTIONS, _CALCULATOR
    _OPTIONS = options
    _CALCULATOR = XRDCalculator(wavelength=options.grid.wavelength)
    warnings.filterwarnings("ignore")  # pymatgen's structure warnings would flood the terminal


def featurize_chunk(items: list[tuple[str, Any, str | None]]) -> list[Featurized]:
    """Featurize ``(material_id, structure_json, measured_path)`` items with this worker's options."""
    if _OPTIONS is None:
        raise RuntimeError("featurize_chunk called in a process that init_worker did not set up")
    return [featurize(mid, text, measured, _OPTIONS, _CALCULATOR) for mid, text, measured in items]
