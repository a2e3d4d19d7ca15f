"""Powder XRD patterns on one fixed 2-theta grid: computed from structures, or measured by a user.

Computed patterns come from pymatgen's :class:`XRDCalculator` (Cu K-alpha by default): its stick
pattern (positions and Lorentz-polarisation-corrected intensities) is spread onto the grid by linear
weights (which keeps each peak's centroid exactly), convolved with a Gaussian of the configured FWHM,
and scaled so the strongest point is 1. Measured patterns are two-column text files (2-theta,
intensity), interpolated onto the same grid, background-floored at their minimum and scaled the same
way; the grid outside the measured range is 0. Both are float32 vectors of :attr:`XRDGrid.size`.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from pymatgen.analysis.diffraction.xrd import XRDCalculator
from pymatgen.core import Structure

#: FWHM -> standard deviation of a Gaussian.
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
#: Unscaled stick intensities below this are numerically extinct reflections (pymatgen only drops
#: sticks relative to the strongest one in range, so a range holding nothing else keeps them).
EXTINCT = 1e-8
#: A measured file needs at least this many numeric rows to be a pattern.
MIN_MEASURED_POINTS = 10


class PatternRejected(ValueError):
    """A pattern that cannot be used; the message is the reason written to rejects."""


@dataclass(frozen=True)
class XRDGrid:
    """The fixed 2-theta grid (degrees) every pattern is put on, and the peak shape used to broaden."""

    two_theta_min: float = 10.0
    two_theta_max: float = 90.0
    step: float = 0.05
    fwhm: float = 0.2
    wavelength: str = "CuKa"

    def __post_init__(self) -> None:
        if not 0 <= self.two_theta_min < self.two_theta_max <= 180:
            raise ValueError("the 2-theta range must satisfy 0 <= min < max <= 180 degrees")
        if self.step <= 0 or self.fwhm <= 0:
            raise ValueError("the 2-theta step and the peak FWHM must be positive")

    @property
    def size(self) -> int:
        """Number of grid points (both ends included)."""
        return round((self.two_theta_max - self.two_theta_min) / self.step) + 1

    @cached_property
    def points(self) -> np.ndarray:
        """The grid's 2-theta values."""
        return np.linspace(self.two_theta_min, self.two_theta_max, self.size)

    @cached_property
    def _kernel(self) -> np.ndarray:
        half = math.ceil(3.0 * self.fwhm / self.step)
        offsets = np.arange(-half, half + 1) * self.step
        return np.exp(-0.5 * (offsets / (self.fwhm * FWHM_TO_SIGMA)) ** 2)

    def describe(self) -> dict:
        """What manifests record about the grid."""
        return {**asdict(self), "size": self.size}

    def broaden(self, positions: np.ndarray, intensities: np.ndarray) -> np.ndarray:
        """Stick peaks (2-theta, intensity) -> a Gaussian-broadened pattern on the grid, max 1."""
        half = self._kernel.size // 2
        n = self.size + 2 * half  # extended so peaks just outside the grid still spill their tails in
        idx = (np.asarray(positions, dtype=float) - self.two_theta_min) / self.step + half
        inside = (idx >= 0) & (idx < n - 1)
        idx, weight = idx[inside], np.asarray(intensities, dtype=float)[inside]
        lo = np.floor(idx).astype(np.int64)
        frac = idx - lo
        sticks = np.bincount(lo, weight * (1 - frac), minlength=n) + np.bincount(lo + 1, weight * frac, minlength=n)
        pattern = np.convolve(sticks[:n], self._kernel, mode="same")[half : half + self.size]
        return _scaled(pattern, "no diffraction peaks in the 2-theta range")


def _scaled(pattern: np.ndarray, empty_reason: str) -> np.ndarray:
    top = float(pattern.max()) if pattern.size else 0.0
    if not top > 0:
        raise PatternRejected(empty_reason)
    return (pattern / top).astype(np.float32)


def computed_pattern(structure: Structure, grid: XRDGrid, calculator: XRDCalculator | None = None) -> np.ndarray:
    """The broadened, normalised powder pattern of ``structure`` on ``grid``."""
    calculator = calculator or XRDCalculator(wavelength=grid.wavelength)
    pad = 3.0 * grid.fwhm
    lo, hi = max(grid.two_theta_min - pad, 0.0), min(grid.two_theta_max + pad, 179.9)
    try:
        sticks = calculator.get_pattern(structure, scaled=False, two_theta_range=(lo, hi))
    except Exception as exc:  # pymatgen lacks scattering factors for a few elements, among others
        raise PatternRejected(f"XRD failed ({type(exc).__name__}: {str(exc).strip()[:120]})") from exc
    x, y = np.asarray(sticks.x, dtype=float), np.asarray(sticks.y, dtype=float)
    real = y > EXTINCT
    return grid.broaden(x[real], y[real])


_SEPARATORS = re.compile(r"[,;\t ]+")


def read_two_columns(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """2-theta and intensity from a two-column text file (.xy, .xye, .txt, .csv, .dat).

    Separators may be whitespace, commas or semicolons; header, comment and other non-numeric lines
    are skipped; columns after the second (e.g. an error column) are ignored.
    """
    xs, ys = [], []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            parts = _SEPARATORS.split(line.strip())
            if len(parts) < 2:
                continue
            try:
                x, y = float(parts[0]), float(parts[1])
            except ValueError:
                continue
            xs.append(x)
            ys.append(y)
    if len(xs) < MIN_MEASURED_POINTS:
        raise PatternRejected(f"fewer than {MIN_MEASURED_POINTS} numeric (2-theta, intensity) rows")
    x, y = np.asarray(xs), np.asarray(ys)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise PatternRejected("non-finite values in the pattern")
    order = np.argsort(x, kind="stable")
    return x[order], y[order]


def measured_pattern(path: Path, grid: XRDGrid) -> np.ndarray:
    """A user's measured pattern interpolated onto ``grid`` (0 outside the measured range), max 1."""
    x, y = read_two_columns(path)
    if x[-1] <= grid.two_theta_min or x[0] >= grid.two_theta_max:
        raise PatternRejected(
            f"measured 2-theta range {x[0]:g}-{x[-1]:g} does not overlap the grid "
            f"{grid.two_theta_min:g}-{grid.two_theta_max:g}"
        )
    on_grid = np.interp(grid.points, x, y, left=np.nan, right=np.nan)
    covered = ~np.isnan(on_grid)
    pattern = np.zeros(grid.size)
    pattern[covered] = on_grid[covered] - on_grid[covered].min()
    return _scaled(pattern, "flat measured pattern (no signal above its minimum)")
