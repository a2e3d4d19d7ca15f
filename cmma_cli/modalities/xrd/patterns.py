"""Powder XRD patterns on one fixed 2-theta grid: computed from structures, or measured by a user.

Computed patterns come from :func:`~cmma_cli.modalities.xrd.simulate.stick_pattern` (Cu K-alpha by default),
a vectorised reimplementation of pymatgen's :class:`XRDCalculator` with the same physics and the same
sticks, about 20 times faster per core (``benchmarks/xrd.py``): the stick pattern (positions and
Lorentz-polarisation-corrected intensities) is spread onto the grid by linear
weights (which keeps each peak's centroid exactly), convolved with a Gaussian of the configured FWHM,
and scaled so the strongest point is 1. Measured patterns (two-column text, ``.xrdml``, powder CIFs:
:mod:`~cmma_cli.modalities.xrd.readers`) are converted to the grid's wavelength through d-spacings when
theirs differs, their background is estimated (SNIP) and removed, and they are interpolated onto the same
grid and scaled the same way; the grid outside the measured range is 0. Both are float32 vectors of :attr:`XRDGrid.size`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cmma_cli.modalities.xrd.readers import PatternRejected  # noqa: F401 (re-exported: where it is caught)
from cmma_cli.modalities.xrd.simulate import stick_pattern

if TYPE_CHECKING:
    from pymatgen.analysis.diffraction.xrd import XRDCalculator
    from pymatgen.core import Structure

#: FWHM -> standard deviation of a Gaussian.
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
#: Unscaled stick intensities below this are numerically extinct reflections (pymatgen only drops
#: sticks relative to the strongest one in range, so a range holding nothing else keeps them).
EXTINCT = 1e-8


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
    """The broadened, normalised powder pattern of ``structure`` on ``grid``.

    ``calculator`` is optional: a pymatgen ``XRDCalculator`` whose wavelength, Debye-Waller factors and
    symmetry refinement (``symprec``) replace the grid's wavelength; the sticks are computed the fast way
    either way.
    """
    wavelength, dw_factors = grid.wavelength, None
    pad = 3.0 * grid.fwhm
    lo, hi = max(grid.two_theta_min - pad, 0.0), min(grid.two_theta_max + pad, 179.9)
    try:
        if calculator is not None:
            wavelength, dw_factors = calculator.wavelength, calculator.debye_waller_factors or None
            if calculator.symprec:
                from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

                structure = SpacegroupAnalyzer(structure, symprec=calculator.symprec).get_refined_structure()
        x, y = stick_pattern(structure, wavelength, (lo, hi), dw_factors)
    except Exception as exc:  # no scattering factors for a few elements (Es and heavier), among others
        raise PatternRejected(f"XRD failed ({type(exc).__name__}: {str(exc).strip()[:120]})") from exc
    real = y > EXTINCT
    return grid.broaden(x[real], y[real])


def read_two_columns(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """2-theta (ascending) and intensity from a two-column text file, whatever its suffix.

    Separators may be whitespace, tabs, commas or semicolons, decimal separators points or (consistently)
    commas; header, comment and other non-numeric lines are skipped; columns after the second (an esd, a
    fitted background) are ignored (:func:`~cmma_cli.modalities.xrd.readers.read_text_columns`).
    """
    from cmma_cli.modalities.xrd.readers import read_text_columns

    return read_text_columns(path)


#: Net intensities below this fraction of the file's largest absolute intensity are rounding, not signal.
NET_FLOOR = 1e-9


def measured_pattern(path: Path, grid: XRDGrid, wavelength: float | str | None = None) -> np.ndarray:
    """A user's measured pattern on ``grid`` (0 outside the measured range), max 1.

    The file is read by :func:`~cmma_cli.modalities.xrd.readers.read_pattern` (two-column text, ``.xrdml``,
    powder CIF). Its background (:func:`~cmma_cli.modalities.xrd.readers.estimate_background`, SNIP) is
    subtracted on the measured points and what is left clipped at 0. When the wavelength the file states
    (else ``wavelength``, angstrom or a pymatgen name; else the grid's is assumed) differs from the grid's,
    2-theta is converted through the d-spacing (Bragg), dropping angles that do not exist at the grid's
    wavelength. The net pattern is then interpolated linearly onto the grid.
    """
    from cmma_cli.modalities.xrd.readers import (
        convert_two_theta,
        estimate_background,
        read_pattern,
        wavelength_angstrom,
    )

    measured = read_pattern(path, wavelength)
    x, y = measured.two_theta, measured.intensity
    net = y - estimate_background(x, y)
    net[net <= NET_FLOOR * float(np.abs(y).max())] = 0.0
    target = wavelength_angstrom(grid.wavelength)
    if measured.wavelength is not None and not math.isclose(measured.wavelength, target, rel_tol=1e-7):
        x = convert_two_theta(x, measured.wavelength, target)
        exists = np.isfinite(x)
        x, net = x[exists], net[exists]
        if x.size < 2:
            raise PatternRejected(
                f"no measured 2-theta exists at the grid's wavelength ({measured.wavelength:g} -> {target:g} A)"
            )
    if x[-1] <= grid.two_theta_min or x[0] >= grid.two_theta_max:
        raise PatternRejected(
            f"measured 2-theta range {x[0]:g}-{x[-1]:g} does not overlap the grid "
            f"{grid.two_theta_min:g}-{grid.two_theta_max:g}"
        )
    pattern = np.interp(grid.points, x, net, left=0.0, right=0.0)
    return _scaled(pattern, "flat measured pattern (no signal above its background)")
