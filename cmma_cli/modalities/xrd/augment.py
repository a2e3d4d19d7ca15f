"""Training augmentation: computed patterns made to look the way real measurements do.

A model trained only on computed patterns learns their perfection: every peak where the structure says, as
sharp as the broadening, no background, no noise, one phase. Measured patterns break each of those, so every
training pattern is transformed, independently and at random, by what an instrument and a sample do
(:func:`augment`, each with the probability and range named below), then rescaled to max 1:

- **lattice strain**: d-spacings scaled by up to ±:data:`STRAIN` (thermal expansion, solid solutions, DFT's
  lattice error), which moves high-angle peaks more than low-angle ones;
- **zero shift**: every peak moved by up to ±``max_shift`` grid points (instrument zero, sample displacement);
- **broadening**: convolved with a Gaussian of up to :data:`BROADEN_DEG` FWHM (small crystallites, microstrain);
- **texture**: intensities modulated smoothly along 2-theta (preferred orientation, absorption);
- **impurity peaks**: up to :data:`IMPURITY_PEAKS` stray peaks (a minor phase, the sample holder);
- **mixture**: part of another training pattern of the batch added (a second phase); the pattern still
  belongs to its own structure, as the majority phase of a mixture does;
- **background** left after subtraction, and **counting noise** (Poisson-like, larger on peaks).
"""

from __future__ import annotations

import math

import numpy as np

#: Probability that a pattern gets each augmentation.
P_STRAIN, P_BROADEN, P_TEXTURE, P_IMPURITY, P_MIXTURE, P_BACKGROUND, P_NOISE = 0.7, 0.6, 0.8, 0.3, 0.25, 0.5, 0.7
#: Largest isotropic lattice strain (fraction).
STRAIN = 0.015
#: Largest extra Gaussian broadening (FWHM, degrees 2-theta).
BROADEN_DEG = 0.4
#: Texture: log-normal intensity modulation of this standard deviation at TEXTURE_KNOTS points along 2-theta.
TEXTURE_SD, TEXTURE_KNOTS = 0.25, 8
#: Impurity peaks: up to this many, each up to IMPURITY_HEIGHT of the strongest peak.
IMPURITY_PEAKS, IMPURITY_HEIGHT = 3, 0.2
#: Mixtures: another pattern added with a weight up to this.
MIXTURE_WEIGHT = 0.5
#: Background left after subtraction: up to this fraction of the strongest peak.
BACKGROUND = 0.1
#: Counting noise: up to this fraction of the strongest peak (standard deviation at the top of a peak).
NOISE = 0.03


def _strained(patterns: np.ndarray, rows: np.ndarray, strain: np.ndarray, two_theta: np.ndarray,
              wavelength: float) -> None:
    """Resample ``patterns[rows]`` in place as if every d-spacing were ``(1 + strain)`` times longer."""
    sin_theta = np.sin(np.radians(two_theta / 2))
    for row, eps in zip(rows, strain):
        # the value at 2θ now is what was at the angle whose d, stretched, gives 2θ: sin θ_old = sin θ (1 + eps)
        old = 2 * np.degrees(np.arcsin(np.clip(sin_theta * (1 + eps), -1, 1)))
        patterns[row] = np.interp(old, two_theta, patterns[row], left=0.0, right=0.0)


def _shifted(patterns: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    out = np.zeros_like(patterns)
    length = patterns.shape[1]
    for i, shift in enumerate(shifts):  # a slice copy per pattern: cheaper than fancy indexing
        if shift >= 0:
            out[i, shift:] = patterns[i, : length - shift]
        else:
            out[i, :shift] = patterns[i, -shift:]
    return out


def _broadened(patterns: np.ndarray, rows: np.ndarray, sigma_points: np.ndarray) -> None:
    """Convolve ``patterns[rows]`` in place with Gaussians of the given standard deviations (grid points)."""
    if rows.size == 0:
        return
    length = patterns.shape[1]
    size = 1 << int(math.ceil(math.log2(length + 64)))
    freq = np.fft.rfftfreq(size)
    kernels = np.exp(-2 * (math.pi * freq[None, :] * sigma_points[:, None]) ** 2)  # the Gaussian's transform
    spectra = np.fft.rfft(patterns[rows], size) * kernels
    patterns[rows] = np.fft.irfft(spectra, size)[:, :length]


def augment(patterns: np.ndarray, rng: np.random.Generator, max_shift: int, step: float = 0.05,
            two_theta_min: float = 10.0, wavelength: float = 1.54184) -> np.ndarray:
    """Patterns (``(n, length)``, on a grid from ``two_theta_min`` every ``step`` degrees at ``wavelength``
    angstrom) as real measurements might give them; rescaled to max 1. See the module docstring."""
    n, length = patterns.shape
    out = np.array(patterns, dtype=np.float64)
    two_theta = two_theta_min + step * np.arange(length)

    def chosen(p: float) -> np.ndarray:
        return np.flatnonzero(rng.random(n) < p)

    if n > 1:  # mixtures first: the added phase then goes through the same instrument
        rows = chosen(P_MIXTURE)
        partners = (rows + rng.integers(1, n, size=rows.size)) % n
        out[rows] += rng.uniform(0.05, MIXTURE_WEIGHT, size=(rows.size, 1)) * patterns[partners]
    rows = chosen(P_STRAIN)
    _strained(out, rows, rng.uniform(-STRAIN, STRAIN, size=rows.size), two_theta, wavelength)
    out = _shifted(out, rng.integers(-max_shift, max_shift + 1, size=n))
    rows = chosen(P_BROADEN)
    _broadened(out, rows, rng.uniform(0, BROADEN_DEG, size=rows.size) / step / (2 * math.sqrt(2 * math.log(2))))
    rows = chosen(P_TEXTURE)
    knots = np.exp(rng.normal(0.0, TEXTURE_SD, size=(rows.size, TEXTURE_KNOTS)))
    where = np.linspace(0, TEXTURE_KNOTS - 1, length)
    lo = np.floor(where).astype(np.int64).clip(0, TEXTURE_KNOTS - 2)
    frac = where - lo
    out[rows] *= knots[:, lo] * (1 - frac) + knots[:, lo + 1] * frac
    out /= np.maximum(out.max(axis=1, keepdims=True), 1e-12)
    rows = chosen(P_IMPURITY)
    for row in rows:
        count = rng.integers(1, IMPURITY_PEAKS + 1)
        centres = rng.uniform(0, length, size=count)
        heights = rng.uniform(0.02, IMPURITY_HEIGHT, size=count)
        widths = rng.uniform(0.05, 0.3, size=count) / step / 2.355
        grid = np.arange(length)[None, :]
        out[row] += (heights[:, None] * np.exp(-0.5 * ((grid - centres[:, None]) / widths[:, None]) ** 2)).sum(axis=0)
    rows = chosen(P_BACKGROUND)
    x = np.linspace(0, 1, length)[None, :]
    level = rng.uniform(0, BACKGROUND, size=(rows.size, 1))
    decay = rng.uniform(0.5, 5, size=(rows.size, 1))
    hump = rng.uniform(0, BACKGROUND, size=(rows.size, 1)) * np.exp(
        -0.5 * ((x - rng.uniform(0.05, 0.4, size=(rows.size, 1))) / rng.uniform(0.05, 0.2, size=(rows.size, 1))) ** 2)
    out[rows] += level * np.exp(-decay * x) + hump
    rows = chosen(P_NOISE)
    scale = rng.uniform(0, NOISE, size=(rows.size, 1))
    out[rows] += scale * np.sqrt(np.clip(out[rows], 0, None) + 0.01) * rng.standard_normal((rows.size, length))
    np.clip(out, 0, None, out=out)
    out /= np.maximum(out.max(axis=1, keepdims=True), 1e-12)
    return out.astype(np.float32)
