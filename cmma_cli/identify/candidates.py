"""The candidate phases ``cmma identify`` searches: a workspace's materials and a user's reference CIFs.

Each candidate has an id, a formula, its elements, a space group, where it came from, and its computed
pattern on the workspace's XRD grid (for the cosine recall; ``processed/``'s own ``xrd`` column where it is
computed, else computed here). Structures are parsed only for the candidates a recall passes on, and their
wavelength-free reflections (:func:`~cmma_cli.modalities.xrd.simulate.reflections`) are computed then and
kept, so a pattern at any wavelength can be fitted.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from cmma_cli.console import console
from cmma_cli.errors import CMMAError
from cmma_cli.modalities.xrd import XRDModality
from cmma_cli.sources.schema import STRUCTURE_COLUMN
from cmma_cli.workspace import Workspace, read_manifest

#: The processed column of computed patterns (the xrd modality's).
PATTERNS = XRDModality.columns[0]

@dataclass
class Candidates:
    """Every candidate phase, row-aligned: metadata, computed patterns on ``grid``, and (lazily) reflections."""

    ids: list[str]
    formulas: list[str]
    elements: list[frozenset[str]]
    spacegroups: list[str]
    sources: list[str]  # "workspace" or "references"
    patterns: np.ndarray  # (n, grid size) float32, unit norm (zero rows: no pattern)
    grid: Any  # the XRDGrid of ``patterns``
    structure_text: dict[int, str] = field(default_factory=dict, repr=False)  # row -> raw JSON (workspace), lazy
    structures: dict[int, Any] = field(default_factory=dict, repr=False)  # row -> Structure (parsed)
    workspace: Workspace | None = None
    _reflections: dict[tuple[int, float], Any] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    def allowed(self, elements: set[str] | None) -> np.ndarray:
        """Which candidates hold only ``elements`` (all, when None)."""
        if not elements:
            return np.ones(len(self), dtype=bool)
        return np.array([e <= elements for e in self.elements], dtype=bool)

    def structure(self, row: int):
        if row not in self.structures:
            from cmma_cli.preprocess.featurize import parse_structure

            if row not in self.structure_text:
                self._load_structures([row])
            self.structures[row] = parse_structure(self.structure_text[row])
        return self.structures[row]

    def _load_structures(self, rows: list[int]) -> None:
        wanted = {self.ids[r]: r for r in rows if r not in self.structure_text}
        if not wanted or self.workspace is None:
            return
        path = self.workspace.raw / "materials.parquet"
        table = pq.read_table(path, columns=["material_id", STRUCTURE_COLUMN], filters=[("material_id", "in", list(wanted))])
        for mid, text in zip(table.column("material_id").to_pylist(), table.column(STRUCTURE_COLUMN).to_pylist()):
            if mid in wanted:
                self.structure_text[wanted[mid]] = text

    def reflections(self, rows: list[int], d_min: float):
        """``{row: Reflections or None}`` (None: the structure cannot be diffracted) down to ``d_min``."""
        from cmma_cli.modalities.xrd.simulate import reflections

        self._load_structures([r for r in rows if r not in self.structures])
        out = {}
        for row in rows:
            key = (row, d_min)
            if key not in self._reflections:
                try:
                    self._reflections[key] = reflections(self.structure(row), d_min)
                except Exception:  # no scattering factors for an element, an unreadable structure
                    self._reflections[key] = None
            out[row] = self._reflections[key]
        return out


def _unit_rows(patterns: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(patterns, axis=1, keepdims=True)
    return (patterns / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def default_grid():
    from cmma_cli.config import PreprocessConfig
    from cmma_cli.modalities.xrd import grid_of

    return grid_of(PreprocessConfig().xrd)


def workspace_candidates(ws: Workspace) -> Candidates | None:
    """The workspace's processed materials as candidates (None when it has no processed XRD patterns)."""
    manifest = read_manifest(ws.processed)
    path = ws.processed / "materials.parquet"
    if manifest is None or not path.is_file():
        return None
    names = pq.ParquetFile(path).schema_arrow.names
    if PATTERNS not in names or "xrd_grid" not in manifest:
        return None
    from cmma_cli.modalities.columns import csr
    from cmma_cli.modalities.xrd.patterns import XRDGrid

    cols = [c for c in ("material_id", "formula", "elements", "spacegroup_symbol", PATTERNS) if c in names]
    table = pq.read_table(path, columns=cols)
    grid_facts = {k: v for k, v in manifest["xrd_grid"].items() if k != "size"}
    grid = XRDGrid(**grid_facts)
    values, offsets, valid = csr(table.column(PATTERNS), np.float32)
    patterns = np.zeros((table.num_rows, grid.size), dtype=np.float32)
    patterns[valid] = values.reshape(-1, grid.size)
    ids = [str(m) for m in table.column("material_id").to_pylist()]
    elements = table.column("elements").to_pylist() if "elements" in cols else [[] for _ in ids]
    groups = table.column("spacegroup_symbol").to_pylist() if "spacegroup_symbol" in cols else [""] * len(ids)
    return Candidates(ids, [str(f) for f in table.column("formula").to_pylist()],
                      [frozenset(e or []) for e in elements], [g or "" for g in groups], ["workspace"] * len(ids),
                      _unit_rows(patterns), grid, workspace=ws)


def reference_candidates(paths: list[Path], grid) -> tuple[Candidates, list[dict[str, str]]]:
    """CIF files (or folders of them) as candidates, with their patterns computed on ``grid``; and the rejects."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    from cmma_cli.modalities.xrd.patterns import PatternRejected, computed_pattern
    from cmma_cli.modalities.xrd.readers import is_pattern_cif
    from cmma_cli.sources.structures import parse_cif

    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() == ".cif")
        elif p.is_file():
            files.append(p)
        else:
            raise CMMAError(f"The reference path {p} does not exist: give CIF files or folders of them to --references.")
    if not files:
        raise CMMAError(f"No .cif files in {', '.join(map(str, paths))}: --references takes CIF files or folders of them.")
    ids, formulas, elements, groups, patterns, structures, rejects = [], [], [], [], [], {}, []
    for f in files:
        try:
            if is_pattern_cif(f):
                raise ValueError("it holds a measured powder pattern, not a structure")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s = parse_cif(f.read_text(encoding="utf-8", errors="replace"))
                pattern = computed_pattern(s, grid)
                try:
                    group = SpacegroupAnalyzer(s, symprec=0.1).get_space_group_symbol()
                except Exception:  # spglib refuses some cells; the symbol is only shown
                    group = ""
        except (ValueError, PatternRejected, OSError) as exc:
            rejects.append({"source": "references", "item": str(f), "reason": str(exc)})
            continue
        structures[len(ids)] = s
        ids.append(f.stem)
        formulas.append(s.composition.reduced_formula)
        elements.append(frozenset(el.symbol for el in s.composition.elements))
        groups.append(group)
        patterns.append(pattern)
    if not ids:
        raise CMMAError(f"None of the {len(files)} reference CIFs could be used ({rejects[0]['reason']}): check the files.")
    stacked = np.stack(patterns) if patterns else np.zeros((0, grid.size), np.float32)
    return Candidates(ids, formulas, elements, groups, ["references"] * len(ids), _unit_rows(stacked), grid,
                      structures=structures), rejects


def merged(first: Candidates | None, second: Candidates | None) -> Candidates:
    """The candidates of both (the second's ids prefixed ``ref:`` where they clash with the first's)."""
    if first is None or second is None:
        found = first or second
        if found is None:
            raise CMMAError("There is nothing to compare the pattern with: run `cmma preprocess` (with --xrd) in this "
                            "workspace, or give reference structures with --references FOLDER.")
        return found
    taken = set(first.ids)
    ids = first.ids + [f"ref:{i}" if i in taken else i for i in second.ids]
    shift = len(first)
    out = Candidates(ids, first.formulas + second.formulas, first.elements + second.elements,
                     first.spacegroups + second.spacegroups, first.sources + second.sources,
                     np.concatenate([first.patterns, second.patterns]), first.grid,
                     structure_text=dict(first.structure_text),
                     structures={**first.structures, **{r + shift: s for r, s in second.structures.items()}},
                     workspace=first.workspace)
    return out


def load_candidates(ws: Workspace, references: list[Path]) -> tuple[Candidates, list[dict[str, str]]]:
    """The workspace's materials plus the reference CIFs, on the workspace's grid (the default grid without one)."""
    own = workspace_candidates(ws)
    rejects: list[dict[str, str]] = []
    refs = None
    if references:
        refs, rejects = reference_candidates(references, own.grid if own is not None else default_grid())
        if rejects:
            from rich.markup import escape

            console.print(f"[yellow]{len(rejects)} reference CIF(s) skipped, e.g. {escape(rejects[0]['item'])}: "
                          f"{escape(rejects[0]['reason'])}[/]", highlight=False, soft_wrap=True)
    return merged(own, refs), rejects
