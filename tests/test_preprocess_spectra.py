"""XRD patterns: peak positions of NaCl and Si against known Cu K-alpha values; measured files."""

from __future__ import annotations

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure
from scipy.signal import find_peaks

from cmma_cli.modalities.xrd.patterns import PatternRejected, XRDGrid, computed_pattern, measured_pattern

# Cu K-alpha1 (1.5406 A) powder lines, degrees 2-theta: NaCl, ICDD 05-0628; Si, NIST SRM 640.
NACL_PEAKS = [27.37, 31.70, 45.45, 56.48, 66.23, 75.30, 83.98]  # (111) (200) (220) (222) (400) (420) (422)
SI_PEAKS = [28.44, 47.30, 56.12, 69.13, 76.38, 88.03]  # (111) (220) (311) (400) (331) (422)
FINE = XRDGrid(step=0.01, fwhm=0.1, wavelength="CuKa1")


FCC = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])


def nacl() -> Structure:
    """Rock salt, conventional cell (a = 5.640 A)."""
    return Structure(Lattice.cubic(5.640), ["Na"] * 4 + ["Cl"] * 4, np.vstack([FCC, FCC + [0.5, 0, 0]]))


def silicon() -> Structure:
    """Diamond-structure silicon, conventional cell (a = 5.431 A)."""
    return Structure(Lattice.cubic(5.431), ["Si"] * 8, np.vstack([FCC, FCC + 0.25]))


def peak_positions(pattern: np.ndarray, grid: XRDGrid, height: float = 0.03) -> np.ndarray:
    found, _ = find_peaks(pattern, height=height)
    return grid.points[found]


@pytest.mark.parametrize("make, known", [(nacl, NACL_PEAKS), (silicon, SI_PEAKS)], ids=["NaCl", "Si"])
def test_peaks_sit_at_the_known_two_theta_values(make, known):
    pattern = computed_pattern(make(), FINE)
    found = peak_positions(pattern, FINE)
    assert len(found) == len(known)
    np.testing.assert_allclose(found, known, atol=0.03)


def test_strongest_lines_and_extinctions():
    nacl_pattern = computed_pattern(nacl(), FINE)
    assert abs(FINE.points[np.argmax(nacl_pattern)] - 31.70) < 0.08  # NaCl (200) is the strongest line
    si_pattern = computed_pattern(silicon(), FINE)
    assert abs(FINE.points[np.argmax(si_pattern)] - 28.44) < 0.08  # Si (111)
    forbidden = np.abs(FINE.points - 32.96) < 0.3  # Si (200) is extinct in the diamond structure
    assert si_pattern[forbidden].max() < 1e-3


def test_pattern_is_a_fixed_length_normalised_float32_vector():
    grid = XRDGrid()  # the default: 10-90 degrees at 0.05
    pattern = computed_pattern(silicon(), grid)
    assert grid.size == 1601 and pattern.shape == (1601,)
    assert pattern.dtype == np.float32
    assert pattern.max() == pytest.approx(1.0) and pattern.min() >= 0.0


def test_no_peak_in_range_is_a_reject_not_a_flat_pattern():
    with pytest.raises(PatternRejected, match="no diffraction peaks"):
        computed_pattern(silicon(), XRDGrid(two_theta_min=5.0, two_theta_max=20.0))


def write_xy(path, x, y, header="# 2theta intensity", sep=" "):
    path.write_text(header + "\n" + "\n".join(f"{a:.4f}{sep}{b:.6f}" for a, b in zip(x, y)) + "\n")
    return path


def test_default_cu_k_alpha_is_the_weighted_doublet():
    # CuKa (1.54184 A, the K-alpha1/alpha2 mean most lab patterns show) puts Si (111) 0.024 deg above K-alpha1
    pattern = computed_pattern(silicon(), XRDGrid(step=0.01, fwhm=0.1))
    assert FINE.points[np.argmax(pattern)] == pytest.approx(28.44 + 0.024, abs=0.015)


def test_measured_file_is_interpolated_onto_the_grid(tmp_path):
    grid = XRDGrid(wavelength="CuKa1")
    # a "measured" file: the Si pattern on another grid (5-100 degrees, 0.02 step), scaled, comma separated
    other = XRDGrid(two_theta_min=5.0, two_theta_max=100.0, step=0.02, wavelength="CuKa1")
    counts = 5000.0 * computed_pattern(silicon(), other) + 120.0  # counts over a flat background
    path = write_xy(tmp_path / "mp-149.csv", other.points, counts, header="two_theta,counts", sep=",")
    pattern = measured_pattern(path, grid)
    assert pattern.shape == (grid.size,) and pattern.dtype == np.float32
    np.testing.assert_allclose(pattern, computed_pattern(silicon(), grid), atol=0.05)
    np.testing.assert_allclose(peak_positions(pattern, grid, 0.05), SI_PEAKS, atol=0.05)


def test_measured_range_narrower_than_the_grid_is_zero_outside(tmp_path):
    grid = XRDGrid()
    x = np.arange(20.0, 60.0, 0.02)
    y = np.exp(-0.5 * ((x - 40.0) / 0.1) ** 2) + 0.01
    pattern = measured_pattern(write_xy(tmp_path / "a.xy", x, y), grid)
    assert pattern[grid.points < 19.99].max() == 0 and pattern[grid.points > 60.01].max() == 0
    assert abs(grid.points[np.argmax(pattern)] - 40.0) < 0.03


def test_unusable_measured_files_say_why(tmp_path):
    grid = XRDGrid()
    short = write_xy(tmp_path / "short.xy", [20, 21, 22], [1, 2, 3])
    with pytest.raises(PatternRejected, match="fewer than 10 numeric"):
        measured_pattern(short, grid)
    far = write_xy(tmp_path / "far.xy", np.arange(100.0, 120.0), np.arange(20.0))
    with pytest.raises(PatternRejected, match="does not overlap the grid"):
        measured_pattern(far, grid)
    flat = write_xy(tmp_path / "flat.xy", np.arange(20.0, 60.0), np.full(40, 7.0))
    with pytest.raises(PatternRejected, match="flat measured pattern"):
        measured_pattern(flat, grid)
