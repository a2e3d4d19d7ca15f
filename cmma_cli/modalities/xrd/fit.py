"""Fitting computed phases to a measured powder pattern: the physics behind ``cmma identify``.

A measured pattern differs from a computed one in ways no database entry knows about: the instrument's zero
shift and the sample's displacement move every peak; a slightly different lattice (temperature, solid
solution, DFT's over-binding) stretches the d-spacings; crystallite size and strain broaden the peaks; the
background rises and falls; preferred orientation changes relative intensities. So a candidate phase is not
compared as it is computed, but after fitting what a measurement changes:

- the background is estimated and removed first (SNIP, :func:`~cmma_cli.modalities.xrd.readers.estimate_background`),
  and the pattern is put on a uniform 2-theta grid of :data:`STEP` degrees;
- for each candidate, its wavelength-free reflections (:mod:`~cmma_cli.modalities.xrd.simulate`) are rendered at
  the measurement's wavelength for every isotropic lattice strain in :data:`STRAINS` and every peak width in
  :data:`WIDTHS` (pseudo-Voigt peaks, half Lorentzian), as a Kα1/Kα2 doublet when the source is a Cu or Mo
  Kα tube; and every zero shift up to :data:`MAX_SHIFT` degrees is tried by sliding it along the measured
  pattern;
- the score is the cosine similarity of the best rendering with the measured pattern: 1 when every measured
  peak is explained with the right relative intensity and nothing is predicted that is not seen. Intensity
  differences from texture lower it, but they do not move peaks, so the right phase keeps its lead.

Mixtures (:func:`decompose`): the best phase is fitted, its scaled profile subtracted, and the residual searched
again, each further phase with the first one's zero shift (to :data:`SHIFT_AGREEMENT`: one sample, one instrument); the phases found are refitted together by non-negative least squares and a new phase is kept only while
it lowers the misfit by at least ``min_gain`` (a fraction of the misfit before it). The fitted scale factors give
weight fractions by Hill and Howard's relation ``W_p ∝ S_p · M_p · V_p`` (cell mass and volume), without an
absorption correction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

#: The uniform 2-theta step (degrees) patterns are fitted on.
STEP = 0.02
#: Isotropic lattice strains tried (d -> d·(1 + strain)).
STRAINS = np.linspace(-0.015, 0.015, 13)
#: Peak widths tried (FWHM, degrees 2-theta): from a sharp laboratory peak to a nanocrystalline one.
WIDTHS = (0.06, 0.1, 0.15, 0.22, 0.32, 0.45, 0.65)
#: Zero shifts tried: up to this many degrees either way.
MAX_SHIFT = 0.3
#: Further phases of a mixture share the first one's zero shift to within this many degrees (instrument zero and
#: sample displacement are the sample's, not a phase's).
SHIFT_AGREEMENT = 0.1
#: Lorentzian fraction of the pseudo-Voigt peak.
ETA = 0.5
#: A phase joins a mixture only while it lowers the misfit by at least this fraction.
MIN_GAIN = 0.15
#: Kα1 / Kα2 wavelengths (angstrom) and the Kα2/Kα1 intensity ratio, for tubes whose Kα average is given.
DOUBLETS = {
    1.54184: (1.540562, 1.544398, 0.5),  # Cu
    0.71073: (0.709300, 0.713590, 0.5),  # Mo
    1.79026: (1.788965, 1.792850, 0.5),  # Co
    1.93735: (1.936042, 1.939980, 0.5),  # Fe
}


@dataclass
class Observed:
    """A measured pattern ready to fit: background removed, on a uniform grid, scaled to max 1."""

    two_theta: np.ndarray  # the uniform grid (degrees)
    intensity: np.ndarray  # background-subtracted, >= 0, max 1
    background: np.ndarray  # the estimated background on the grid, same scale
    wavelength: float  # angstrom
    scale: float  # counts per unit of ``intensity``

    @property
    def norm(self) -> float:
        return float(np.linalg.norm(self.intensity))


def observe(two_theta: np.ndarray, intensity: np.ndarray, wavelength: float, step: float = STEP) -> Observed:
    """A measured pattern (any spacing) -> :class:`Observed`: resampled to ``step``, background removed."""
    from cmma_cli.modalities.xrd.patterns import PatternRejected
    from cmma_cli.modalities.xrd.readers import estimate_background

    grid = np.arange(two_theta[0], two_theta[-1] + step / 2, step)
    if grid.size < 50:
        raise PatternRejected(f"the pattern spans only {two_theta[-1] - two_theta[0]:.2f} degrees 2-theta, too "
                              "little to identify phases from")
    on_grid = np.interp(grid, two_theta, intensity)
    background = estimate_background(grid, on_grid)
    signal = np.clip(on_grid - background, 0.0, None)
    top = float(signal.max())
    if not top > 0:
        raise PatternRejected("the pattern has no signal above its background")
    return Observed(grid, signal / top, background / top, float(wavelength), top)


def _lines(wavelength: float) -> list[tuple[float, float]]:
    """``(wavelength, weight)`` of the emission lines a source of this (average) wavelength gives."""
    for average, (k1, k2, ratio) in DOUBLETS.items():
        if abs(wavelength - average) < 5e-4:
            return [(k1, 1.0 / (1.0 + ratio)), (k2, ratio / (1.0 + ratio))]
    return [(wavelength, 1.0)]


def _fft_size(n: int) -> int:
    size = 1
    while size < n:
        size *= 2
    return size


#: Points of padding on each side of the grid, so peaks just outside the measured range spill their tails in.
PAD = 256
_KERNELS: dict[tuple[float, float, int], np.ndarray] = {}


def _kernel_fft(fwhm: float, step: float, size: int) -> np.ndarray:
    """The real FFT of a pseudo-Voigt peak of unit area, centred on point 0 of a circular array of ``size``."""
    key = (fwhm, step, size)
    if key not in _KERNELS:
        half = min(int(math.ceil(5 * fwhm / step)), size // 2 - 1)
        t = np.arange(-half, half + 1) * step
        gauss = np.exp(-0.5 * (t / (fwhm / (2 * math.sqrt(2 * math.log(2))))) ** 2)
        lorentz = 1.0 / (1.0 + (2 * t / fwhm) ** 2)
        shape = ETA * lorentz + (1 - ETA) * gauss
        circular = np.zeros(size)
        circular[np.arange(-half, half + 1) % size] = shape / shape.sum()
        _KERNELS[key] = np.fft.rfft(circular)
    return _KERNELS[key]


def sticks(d: np.ndarray, intensity: np.ndarray, wavelength: float, strain: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Reflections (d, ``|F|²·multiplicity``) -> stick positions (2-theta) and Lorentz-polarisation-corrected
    intensities at ``wavelength`` (every emission line of the source), after an isotropic ``strain``."""
    xs, ys = [], []
    for lam, weight in _lines(wavelength):
        s = lam / (2 * d * (1 + strain))
        ok = s < 1
        theta = np.arcsin(s[ok])
        lp = (1 + np.cos(2 * theta) ** 2) / (np.sin(theta) ** 2 * np.cos(theta))
        xs.append(np.degrees(2 * theta))
        ys.append(weight * intensity[ok] * lp)
    return np.concatenate(xs), np.concatenate(ys)


def _spikes(x: np.ndarray, y: np.ndarray, grid: np.ndarray, size: int) -> np.ndarray:
    """Sticks spread by linear weights onto a padded copy of ``grid`` (its point ``PAD`` is ``grid[0]``)."""
    step = float(grid[1] - grid[0])
    idx = (x - grid[0]) / step + PAD
    inside = (idx >= 0) & (idx < grid.size + 2 * PAD - 1)
    idx, y = idx[inside], y[inside]
    lo = np.floor(idx).astype(np.int64)
    frac = idx - lo
    return (np.bincount(lo, y * (1 - frac), minlength=size)[:size]
            + np.bincount(lo + 1, y * frac, minlength=size)[:size])


def render(d: np.ndarray, intensity: np.ndarray, grid: np.ndarray, wavelength: float, strain: float = 0.0,
           fwhm: float = 0.1, shift: float = 0.0) -> np.ndarray:
    """The computed profile on ``grid`` (uniform, degrees): peaks of area ``|F|²·m·LP`` (unscaled)."""
    step = float(grid[1] - grid[0])
    size = _fft_size(grid.size + 2 * PAD)
    x, y = sticks(d, intensity, wavelength, strain)
    spectrum = np.fft.rfft(_spikes(x + shift, y, grid, size)) * _kernel_fft(fwhm, step, size)
    return np.fft.irfft(spectrum, size)[PAD:PAD + grid.size]


@dataclass
class PhaseFit:
    """The best rendering of one candidate against a target pattern."""

    score: float  # cosine similarity of the rendering with the target, 0..1
    strain: float = 0.0
    fwhm: float = 0.1
    shift: float = 0.0
    profile: np.ndarray | None = field(default=None, repr=False)  # the rendering (unscaled), on the grid


def fit_phase(d: np.ndarray, intensity: np.ndarray, observed: Observed, target: np.ndarray | None = None,
              shifts: tuple[float, float] | None = None) -> PhaseFit:
    """The zero shift, strain and peak width that best match ``target`` (default: the observed pattern); ``shifts``
    narrows the zero shifts tried to ``(low, high)`` degrees (within ±:data:`MAX_SHIFT`).

    Every (strain, width) rendering and every shift is scored at once in Fourier space: the sticks of each
    strain are transformed once and multiplied by each peak shape's transform; correlating that with the
    target gives the dot product at every shift, and Parseval gives each rendering's norm.
    """
    y = observed.intensity if target is None else target
    grid = observed.two_theta
    step = float(grid[1] - grid[0])
    reach = int(round(MAX_SHIFT / step))
    norm_y = float(np.linalg.norm(y))
    if norm_y == 0 or d.size == 0:
        return PhaseFit(0.0)
    size = _fft_size(grid.size + 2 * PAD)
    padded = np.zeros(size)
    padded[PAD:PAD + grid.size] = y
    target_fft = np.fft.rfft(padded)
    spikes = np.stack([_spikes(*sticks(d, intensity, observed.wavelength, strain), grid, size) for strain in STRAINS])
    kernels = np.stack([_kernel_fft(w, step, size) for w in WIDTHS])
    profiles = np.fft.rfft(spikes)[:, None, :] * kernels[None, :, :]  # (strains, widths, frequencies)
    power = np.abs(profiles) ** 2
    norms = np.sqrt((2 * power.sum(axis=-1) - power[..., 0] - power[..., -1]) / size)  # Parseval for rfft
    corr = np.fft.irfft(target_fft[None, None, :] * np.conj(profiles), size)  # [..., k] = <y, p moved by +k>
    moves = np.arange(-reach, reach + 1)
    if shifts is not None:
        moves = moves[(moves * step >= shifts[0] - 1e-9) & (moves * step <= shifts[1] + 1e-9)]
    scores = corr[..., moves % size] / (norm_y * np.where(norms > 0, norms, np.inf))[..., None]
    i, j, k = np.unravel_index(int(np.argmax(scores)), scores.shape)
    best = PhaseFit(float(scores[i, j, k]), float(STRAINS[i]), WIDTHS[j], float(moves[k] * step))
    if best.score > 0:
        best.profile = render(d, intensity, grid, observed.wavelength, best.strain, best.fwhm, best.shift)
    return best


@dataclass
class Phase:
    """One phase of a decomposition: which candidate, its fit, and its share."""

    key: Any  # the candidate, as the proposer named it
    fit: PhaseFit
    scale: float = 0.0  # non-negative least-squares scale of its profile
    gain: float = 0.0  # the fraction of the misfit it removed when it joined
    intensity_fraction: float = 0.0  # share of the fitted integrated intensity
    weight_fraction: float | None = None  # Hill–Howard estimate (None without cell mass and volume)


@dataclass
class Decomposition:
    phases: list[Phase]
    ranked: list[list[tuple[Any, PhaseFit]]]  # per step: the proposed candidates fitted to what was left, best first
    residual: float  # ||observed - fitted|| / ||observed|| after the last phase kept
    fitted: np.ndarray = field(repr=False, default=None)


def rank(proposed: list[tuple[Any, Any]], observed: Observed, target: np.ndarray | None = None,
         shifts: tuple[float, float] | None = None) -> list[tuple[Any, PhaseFit]]:
    """Candidates ``(key, reflections)`` fitted to ``target`` (default: the observed pattern), best first."""
    fits = [(key, fit_phase(refl.d, refl.intensity, observed, target, shifts)) for key, refl in proposed]
    return sorted(fits, key=lambda t: -t[1].score)


def decompose(propose: Callable[[np.ndarray, set], list[tuple[Any, Any]]], observed: Observed, max_phases: int = 3,
              min_gain: float = MIN_GAIN) -> Decomposition:
    """Up to ``max_phases`` phases that together explain ``observed``.

    ``propose(target, taken)`` returns the candidates worth fitting to ``target`` (what is left to explain, on the
    observed grid) as ``(key, reflections)`` pairs, leaving out the keys in ``taken``; ``reflections`` has ``d``,
    ``intensity`` and, for weight fractions, the cell's ``mass`` and ``volume``
    (:class:`~cmma_cli.modalities.xrd.simulate.Reflections`).
    """
    from scipy.optimize import nnls

    y = observed.intensity
    norm_y = observed.norm
    phases: list[Phase] = []
    cells: list[tuple[float, float] | None] = []
    ranked: list[list[tuple[Any, PhaseFit]]] = []
    target, misfit, coef = y, norm_y, np.zeros(0)
    for _ in range(max_phases):
        proposed = propose(np.clip(target, 0.0, None), {p.key for p in phases})
        # one sample, one instrument: every phase shares the first one's zero shift (within SHIFT_AGREEMENT)
        shifts = None if not phases else (phases[0].fit.shift - SHIFT_AGREEMENT, phases[0].fit.shift + SHIFT_AGREEMENT)
        order = rank(proposed, observed, np.clip(target, 0.0, None), shifts)
        ranked.append(order)
        if not order or order[0][1].profile is None:
            break
        key, fit = order[0]
        design = np.stack([p.fit.profile for p in phases] + [fit.profile], axis=1)
        trial, trial_misfit = nnls(design, y)
        gain = 1.0 - trial_misfit / misfit if misfit > 0 else 0.0
        if phases and (gain < min_gain or trial[-1] <= 0):
            break
        refl = dict(proposed)[key]
        phases.append(Phase(key, fit, gain=gain))
        cells.append((getattr(refl, "mass", None), getattr(refl, "volume", None)))
        coef, misfit = trial, trial_misfit
        target = y - design @ coef
    fitted = np.zeros_like(y)
    if phases:
        design = np.stack([p.fit.profile for p in phases], axis=1)
        fitted = design @ coef
        areas = coef * design.sum(axis=0)
        for phase, scale, area in zip(phases, coef, areas):
            phase.scale = float(scale)
            phase.intensity_fraction = float(area / areas.sum()) if areas.sum() > 0 else 0.0
        if all(m and v for m, v in cells):
            weights = coef * np.array([m * v for m, v in cells])
            if weights.sum() > 0:
                for phase, w in zip(phases, weights):
                    phase.weight_fraction = float(w / weights.sum())
    return Decomposition(phases, ranked, float(misfit / norm_y) if norm_y else 1.0, fitted)
