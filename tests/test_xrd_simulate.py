"""The fast XRD simulator against pymatgen's XRDCalculator: same sticks on real, sample and disordered structures."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pymatgen.analysis.diffraction.xrd import WAVELENGTHS, XRDCalculator
from pymatgen.core import Lattice, Structure

from cmma_cli.modalities.xrd.patterns import PatternRejected, XRDGrid, computed_pattern
from cmma_cli.modalities.xrd.simulate import (
    reflections,
    TWO_THETA_TOL,
    stick_pattern,
    two_theta_pattern,
    wavelength_angstrom,
)
from cmma_cli.preprocess.featurize import parse_structure

MP20 = Path(__file__).resolve().parents[2] / "shared" / "data" / "mp20" / "mp20_sample.csv"
SAMPLE = Path(__file__).resolve().parents[1] / "cmma_cli" / "data" / "sample_materials.parquet"
RANGE = (9.4, 90.6)  # the default grid, padded by 3 FWHM as computed_pattern does
POSITION_TOL, INTENSITY_TOL, SHOWN = 0.01, 1.0, 1.0  # degrees; percentage points; peaks above 1 % of the max


def mismatch(reference: tuple, fast: tuple) -> list[str]:
    """Peaks above SHOWN % in one stick pattern (scaled to max 100) without a partner in the other within
    POSITION_TOL degrees and INTENSITY_TOL percentage points."""
    (rx, ry), (fx, fy) = (np.asarray(a, dtype=float) for a in reference), (np.asarray(a, dtype=float) for a in fast)
    ry, fy = 100 * ry / ry.max(), 100 * fy / fy.max()
    problems = []
    for (ax, ay, what), (bx, by) in (((rx, ry, "pymatgen"), (fx, fy)), ((fx, fy, "fast"), (rx, ry))):
        for x, y in zip(ax[ay > SHOWN], ay[ay > SHOWN]):
            near = np.abs(bx - x) <= POSITION_TOL
            if not (near.any() and np.abs(by[near] - y).min() <= INTENSITY_TOL):
                problems.append(f"{what} peak at {x:.4f} deg ({y:.2f} %) has no partner")
    return problems


def pymatgen_sticks(structure, wavelength="CuKa", two_theta_range=RANGE, **kwargs):
    pattern = XRDCalculator(wavelength=wavelength, **kwargs).get_pattern(
        structure, scaled=False, two_theta_range=two_theta_range
    )
    return np.asarray(pattern.x), np.asarray(pattern.y)


def mp20_structures(count: int = 40) -> list[Structure]:
    if not MP20.is_file():
        pytest.skip(f"the real MP-20 sample is not beside the repository ({MP20})")
    table = pd.read_csv(MP20)
    rows = table.iloc[np.linspace(0, len(table) - 1, count).astype(int)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [Structure.from_str(cif, fmt="cif") for cif in rows["cif"]]


def sample_structures() -> dict[str, Structure]:
    """A few built-in sample structures: a hexagonal, a low-symmetry superconductor cell, a spinel."""
    table = pd.read_parquet(SAMPLE).set_index("material_id")
    wanted = ["aflow:AB_hP6_154_a_b:HgS", "aflow:A2B3C7D_oP13_47_t_aq_eqrs_h:Ba2YCu3O7",
              "aflow:A3B4_tI28_141_ad_h:Mn3O4"]  # fmt: skip
    return {name: parse_structure(table.loc[name, "structure"]) for name in wanted}


def disordered() -> Structure:
    """Rock salt with a mixed cation site (Na0.6 K0.3, 10 % vacant) and a partly occupied anion site."""
    fcc = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    return Structure(Lattice.cubic(5.9), [{"Na": 0.6, "K": 0.3}] * 4 + [{"Cl": 0.9, "Br": 0.1}] * 4,
                     np.vstack([fcc, fcc + [0.5, 0, 0]]))


def test_same_sticks_as_pymatgen_on_real_structures():
    failures = {}
    for structure in mp20_structures():
        problems = mismatch(pymatgen_sticks(structure), stick_pattern(structure, "CuKa", RANGE))
        if problems:
            failures[structure.composition.reduced_formula] = problems[:3]
    assert not failures


@pytest.mark.parametrize("name", ["HgS", "Ba2YCu3O7", "Mn3O4", "disordered"])
def test_same_sticks_on_sample_and_disordered_structures(name):
    structure = disordered() if name == "disordered" else next(s for k, s in sample_structures().items() if name in k)
    reference, fast = pymatgen_sticks(structure), stick_pattern(structure, "CuKa", RANGE)
    assert not mismatch(reference, fast)
    # not only the peaks above 1 %: every stick pymatgen gives (a merged peak may sit at an extinct reflection
    # in pymatgen, which the fast path leaves out: positions to pymatgen's own 1e-5 degree merge bins)
    np.testing.assert_allclose(fast[0], reference[0], atol=TWO_THETA_TOL)
    np.testing.assert_allclose(fast[1], reference[1], rtol=1e-9)


def test_other_wavelengths_ranges_and_debye_waller_factors():
    structure = disordered()
    for wavelength, two_theta_range in [("MoKa", (5, 60)), ("CrKa1", (20, 150)), (1.0, None)]:
        assert not mismatch(pymatgen_sticks(structure, wavelength, two_theta_range),
                            stick_pattern(structure, wavelength, two_theta_range))
    dw = {"Na": 1.2, "K": 0.9, "Cl": 0.7}
    reference = pymatgen_sticks(structure, debye_waller_factors=dw)
    fast = stick_pattern(structure, "CuKa", RANGE, debye_waller_factors=dw)
    np.testing.assert_allclose(fast[1], reference[1], rtol=1e-9)
    assert not np.allclose(fast[1], stick_pattern(structure, "CuKa", RANGE)[1])  # the factors do something


def test_anisotropic_displacements_from_site_properties():
    structure = next(iter(sample_structures().values())).copy()
    rng = np.random.default_rng(0)
    for name in ("U11_cif", "U22_cif", "U33_cif"):
        structure.add_site_property(name, list(0.01 + 0.02 * rng.random(len(structure))))
    for name in ("U23_cif", "U13_cif", "U12_cif"):
        structure.add_site_property(name, list(0.002 * rng.random(len(structure))))
    reference, fast = pymatgen_sticks(structure), stick_pattern(structure, "CuKa", RANGE)
    np.testing.assert_allclose(fast[0], reference[0], atol=TWO_THETA_TOL)
    np.testing.assert_allclose(fast[1], reference[1], rtol=1e-9)


def test_wavelength_names_and_angstroms_agree():
    structure = disordered()
    assert wavelength_angstrom("CuKa") == WAVELENGTHS["CuKa"] == wavelength_angstrom("1.54184")
    assert wavelength_angstrom(0.71073) == wavelength_angstrom("MoKa")
    by_name = stick_pattern(structure, "CuKa1", RANGE)
    for same in (1.54056, "1.54056", " 1.54056 "):
        by_number = stick_pattern(structure, same, RANGE)
        np.testing.assert_array_equal(by_number[0], by_name[0])
        np.testing.assert_array_equal(by_number[1], by_name[1])
    for bad in ("CuKz", "", -1.0, 0, "nan", None):
        with pytest.raises(ValueError, match="is not known: give a positive number in angstrom or one of .*CuKa"):
            wavelength_angstrom(bad)


def test_reflections_are_wavelength_free():
    structure = next(s for k, s in sample_structures().items() if "Mn3O4" in k)
    refl = reflections(structure, d_min=0.5)
    assert np.all(np.diff(refl.d) < 0) and refl.d.min() >= 0.5 and np.all(refl.intensity >= 0)
    assert refl.volume == pytest.approx(structure.volume)
    assert refl.mass == pytest.approx(structure.composition.weight)
    assert refl.multiplicity.sum() % 2 == 0 and np.all(refl.multiplicity >= 2)
    # one set of reflections gives the pattern at every wavelength whose range it covers
    for wavelength, two_theta_range in [("CuKa", RANGE), ("MoKa", (5, 40)), ("CoKa", (10, 120))]:
        x, y = two_theta_pattern(refl, wavelength, two_theta_range)
        reference = pymatgen_sticks(structure, wavelength, two_theta_range)
        np.testing.assert_allclose(x, reference[0], atol=TWO_THETA_TOL)
        np.testing.assert_allclose(y, reference[1], rtol=1e-9)
    with pytest.raises(ValueError, match="go down to d = 0.5 A only"):
        two_theta_pattern(refl, "MoKa", (5, 120))
    # the intensities carry no Lorentz-polarisation: NaCl-type (200) vs (111) is a pure |F|^2 ratio
    rock_salt = disordered()
    r = reflections(rock_salt, d_min=1.5)
    f_111, f_200 = r.intensity[0] / r.multiplicity[0], r.intensity[1] / r.multiplicity[1]
    assert r.multiplicity[:2].tolist() == [8, 6] and f_200 > 10 * f_111


def test_element_without_scattering_factors_is_a_reject():
    structure = Structure(Lattice.cubic(4.0), ["Na", "Es"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    with pytest.raises(ValueError, match="no scattering coefficients for Es"):
        stick_pattern(structure)
    with pytest.raises(PatternRejected, match=r"XRD failed \(ValueError: .*no scattering coefficients for Es"):
        computed_pattern(structure, XRDGrid())


def test_computed_pattern_honours_a_given_calculator():
    structure = disordered()
    grid = XRDGrid()
    mo = computed_pattern(structure, grid, XRDCalculator(wavelength="MoKa"))
    np.testing.assert_array_equal(mo, computed_pattern(structure, XRDGrid(wavelength="MoKa")))
    assert not np.allclose(mo, computed_pattern(structure, grid))
