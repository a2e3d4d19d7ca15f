"""``cmma identify``: which known phases a measured powder pattern contains.

For each pattern file (:func:`~cmma_cli.modalities.xrd.readers.read_pattern`: two-column text, ``.xrdml``,
a powder CIF):

1. the wavelength is the file's, else ``--wavelength``, else the workspace's grid's (Cu Kα by default);
   the background is removed and the pattern put on a fine uniform grid
   (:func:`~cmma_cli.modalities.xrd.fit.observe`);
2. **recall**: the pattern, mapped onto the workspace's 2-theta grid through d-spacings (so any wavelength
   works), ranks every candidate by plain cosine with its computed pattern and, when a trained run has
   embeddings, by the learned XRD→structure similarity; the first ``--candidates`` of both rankings, taken in
   turn, go on (:mod:`~cmma_cli.identify.recall`), with every ``--references`` CIF when there are no more
   of them than that. ``--elements`` / ``--chemsys`` leave out every candidate
   holding another element before either;
3. **physics re-rank**: each proposed candidate's reflections are fitted to the pattern with zero shift,
   lattice strain and peak width free (:func:`~cmma_cli.modalities.xrd.fit.fit_phase`), and ranked by the fit;
4. **mixtures**: the best phase's fitted profile is subtracted and steps 2–3 run again on the residual, while
   a further phase lowers the misfit by at least ``--min-gain``, up to ``--max-phases``
   (:func:`~cmma_cli.modalities.xrd.fit.decompose`); the phases' scale factors give weight fractions.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cmma_cli.config import IdentifyConfig
from cmma_cli.errors import CMMAError
from cmma_cli.identify.candidates import load_candidates
from cmma_cli.identify.recall import LearnedRecall, cosine_scores, interleave, order
from cmma_cli.workspace import Workspace


def allowed_elements(cfg: IdentifyConfig) -> set[str] | None:
    """The elements ``--elements`` and ``--chemsys`` allow (None: any), checked against the periodic table."""
    from pymatgen.core.periodic_table import Element

    given = [e.strip() for item in cfg.elements for e in item.split(",")]
    if cfg.chemsys:
        given += [e.strip() for e in cfg.chemsys.split("-")]
    given = [e for e in given if e]
    if not given:
        return None
    unknown = [e for e in given if not Element.is_valid_symbol(e)]
    if unknown:
        raise CMMAError(f"Unknown element symbol(s) {', '.join(unknown)}: give symbols like --elements Li,Mn,O "
                        "or --chemsys Li-Mn-O (case matters: Co, not CO).")
    return set(given)


@dataclass
class Identification:
    """What one pattern holds: the phases found and, per step, the ranked candidates."""

    path: str
    wavelength: float
    wavelength_from: str  # "file", "--wavelength" or "default"
    two_theta_range: tuple[float, float]
    phases: list[dict[str, Any]]
    steps: list[list[dict[str, Any]]]
    residual: float
    recalls: list[str]
    candidates: int  # how many candidates the element constraint left
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


class Identifier:
    """The candidates, and the trained run's encoder when one is used, loaded once for many patterns."""

    def __init__(self, ws: Workspace, cfg: IdentifyConfig):
        started = time.perf_counter()
        self.ws, self.cfg = ws, cfg
        self.elements = allowed_elements(cfg)
        self.candidates, self.rejects = load_candidates(ws, [Path(p) for p in cfg.references])
        self.allowed = self.candidates.allowed(self.elements)
        if not self.allowed.any():
            raise CMMAError(f"No candidate phase holds only {', '.join(sorted(self.elements))}: loosen --elements / "
                            f"--chemsys, or add reference CIFs with --references.")
        self.learned = self._learned()
        # a short list of the user's own references is always fitted: the learned recall does not know them
        refs = np.flatnonzero(self.allowed & (np.array(self.candidates.sources) == "references"))
        self.always = [int(r) for r in refs] if len(refs) <= cfg.candidates else []
        self.recalls = (["learned"] if self.learned is not None else []) + (
            ["cosine"] if cfg.recall in ("auto", "both", "cosine") else [])
        self.load_seconds = time.perf_counter() - started

    def _learned(self) -> LearnedRecall | None:
        wanted = self.cfg.recall
        if wanted == "cosine":
            return None
        has_embeddings = bool(self.ws.finished("embed")) and self.candidates.workspace is not None
        if wanted == "auto" and not has_embeddings:
            return None
        if not has_embeddings:
            raise CMMAError(f"--recall {wanted} needs a trained run's embeddings of this workspace's materials: run "
                            "`cmma train` and `cmma embed` first, or identify with --recall cosine.")
        try:
            return LearnedRecall(self.ws, self.cfg.run, self.candidates)
        except CMMAError:
            if wanted == "auto":
                return None
            raise

    # ------------------------------------------------------------------------------------------ steps

    def on_grid(self, observed, target: np.ndarray) -> np.ndarray:
        """``target`` (on the observed grid) on the candidates' 2-theta grid, through d-spacings, unit norm."""
        from cmma_cli.modalities.xrd.readers import convert_two_theta
        from cmma_cli.modalities.xrd.simulate import wavelength_angstrom

        grid = self.candidates.grid
        at_observed = convert_two_theta(grid.points, wavelength_angstrom(grid.wavelength), observed.wavelength)
        inside = np.isfinite(at_observed) & (at_observed >= observed.two_theta[0]) & (at_observed <= observed.two_theta[-1])
        out = np.zeros(grid.size, dtype=np.float32)
        out[inside] = np.interp(at_observed[inside], observed.two_theta, target)
        norm = float(np.linalg.norm(out))
        return out / norm if norm > 0 else out

    def rankings(self, observed, target: np.ndarray) -> dict[str, np.ndarray]:
        """Every recall's ranking of the allowed candidates for ``target``."""
        query = self.on_grid(observed, target)
        out = {}
        if self.learned is not None:
            out["learned"] = order(self.learned.scores(query), self.allowed)
        if "cosine" in self.recalls:
            out["cosine"] = order(cosine_scores(self.candidates, query), self.allowed)
        return out

    def identify(self, path: Path) -> Identification:
        """Identify the phases of the pattern in ``path``."""
        from cmma_cli.modalities.xrd.fit import decompose, observe
        from cmma_cli.modalities.xrd.patterns import PatternRejected
        from cmma_cli.modalities.xrd.readers import read_pattern
        from cmma_cli.modalities.xrd.simulate import wavelength_angstrom

        started = time.perf_counter()
        path = Path(path)
        if not path.is_file():
            raise CMMAError(f"The pattern file {path} does not exist: check the path.")
        default = self.cfg.wavelength or self.candidates.grid.wavelength
        try:
            pattern = read_pattern(path)
            source = "file" if pattern.wavelength is not None else ("--wavelength" if self.cfg.wavelength else "default")
            wavelength = pattern.wavelength if pattern.wavelength is not None else wavelength_angstrom(default)
            observed = observe(pattern.two_theta, pattern.intensity, wavelength)
        except PatternRejected as exc:
            raise CMMAError(f"Could not read the pattern {path} ({exc}).") from None
        except ValueError as exc:
            raise CMMAError(f"{exc}") from None
        notes = []
        if source == "default":
            notes.append(f"{path.name} states no wavelength: assumed {default} ({wavelength:.5g} Å); pass "
                         "--wavelength if it was measured with another source.")
        if self.cfg.wavelength and pattern.wavelength is not None and \
                abs(wavelength_angstrom(self.cfg.wavelength) - pattern.wavelength) > 1e-4:
            notes.append(f"{path.name} states its wavelength ({pattern.wavelength:.5g} Å), which wins over --wavelength.")
        d_min = wavelength / (2 * np.sin(np.radians(observed.two_theta[-1] / 2))) * 0.98
        steps_rank: list[dict[str, dict[int, int]]] = []

        def propose(target: np.ndarray, taken: set) -> list[tuple[int, Any]]:
            found = self.rankings(observed, target)
            steps_rank.append({name: {int(r): i + 1 for i, r in enumerate(rows)} for name, rows in found.items()})
            rows = [r for r in interleave(list(found.values()), self.cfg.candidates + len(taken)) if r not in taken]
            rows = list(dict.fromkeys([r for r in self.always if r not in taken] + rows[: self.cfg.candidates]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                refl = self.candidates.reflections(rows, d_min)
            return [(r, refl[r]) for r in rows if refl[r] is not None and refl[r].d.size]

        result = decompose(propose, observed, self.cfg.max_phases, self.cfg.min_gain)
        phases = []
        for i, phase in enumerate(result.phases, start=1):
            phases.append({"phase": i, **self._describe(phase.key), "score": round(phase.fit.score, 4),
                           "weight_fraction": None if phase.weight_fraction is None else round(phase.weight_fraction, 4),
                           "intensity_fraction": round(phase.intensity_fraction, 4), "gain": round(phase.gain, 4),
                           **self._params(phase.fit)})
        steps = []
        for ranked, ranks in zip(result.ranked, steps_rank):
            steps.append([{"rank": i, **self._describe(key), "score": round(fit.score, 4), **self._params(fit),
                           "recall_ranks": {name: found.get(key) for name, found in ranks.items()}}
                          for i, (key, fit) in enumerate(ranked[: self.cfg.k], start=1)])
        if phases and result.residual > 0.5:
            notes.append(f"{result.residual:.0%} of the pattern is left unexplained: a phase may be missing from the "
                         "candidates (add its CIF with --references) or the sample may be strongly textured.")
        return Identification(str(path), round(wavelength, 6), source,
                              (round(float(observed.two_theta[0]), 3), round(float(observed.two_theta[-1]), 3)),
                              phases, steps, round(result.residual, 4), list(self.recalls), int(self.allowed.sum()),
                              round(time.perf_counter() - started, 3), notes)

    def _describe(self, row: int) -> dict[str, Any]:
        c = self.candidates
        return {"material_id": c.ids[row], "formula": c.formulas[row], "spacegroup": c.spacegroups[row],
                "source": c.sources[row]}

    @staticmethod
    def _params(fit) -> dict[str, float]:
        return {"shift": round(fit.shift, 3), "strain": round(fit.strain, 4), "fwhm": fit.fwhm}


def run_identify(ws: Workspace, paths: list[Path], cfg: IdentifyConfig, as_json: bool = False) -> list[Identification]:
    """``cmma identify``: every pattern, printed as tables (or JSON on stdout)."""
    from cmma_cli.identify.report import render, to_json

    if not paths:
        raise CMMAError("Give at least one pattern file: cmma identify PATTERN.xy [PATTERN ...].")
    identifier = Identifier(ws, cfg)
    results = []
    for path in paths:
        result = identifier.identify(path)
        results.append(result)
        if not as_json:
            render(result, identifier.candidates)
    if as_json:
        print(to_json(results))
    return results

