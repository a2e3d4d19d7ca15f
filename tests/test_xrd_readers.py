"""Measured powder XRD files on real data: text (decimal points and commas), .xrdml, powder CIF; wavelength
conversion; background removal; which modality claims a CIF."""

from __future__ import annotations

import gzip
import re
import time
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from cmma_cli.modalities.xrd.patterns import PatternRejected, XRDGrid, measured_pattern
from cmma_cli.modalities.xrd.readers import (
    convert_two_theta,
    estimate_background,
    is_pattern_cif,
    read_pattern,
    wavelength_angstrom,
)

SPECTRA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "xrd_measured" / "xrd_autoanalyzer" / "Spectra"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "xrd"
XRDML = FIXTURES / "ASG1_1.xrdml"  # real PANalytical file (PyPowder's tests, GPL-3.0-or-later; see README.md)
PD_CIF = FIXTURES / "MnO_pattern.cif"  # MnO.xy of the shared spectra, 30-50 degrees, as pdCIF
CUKA = 1.54184  # pymatgen's CuKa: (2 K-alpha1 + K-alpha2) / 3


@pytest.fixture(scope="module")
def spectra() -> Path:
    if not sorted(SPECTRA.glob("*.xy")):
        pytest.skip(f"the measured spectra {SPECTRA} are absent (shared/data sits beside the repository in CI)")
    return SPECTRA


def one_sentence(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert text and "\n" not in text and not re.search(r"\.\s+\S", text) and len(text) < 220, text
    return text


# ----------------------------------------------------------------------------------------------- text


def test_the_shared_measured_xy_files_read_with_their_extra_column_ignored(spectra):
    files = sorted(spectra.glob("*.xy"))
    assert len(files) == 8
    for path in files:
        raw = np.loadtxt(path)  # tab separated, CRLF, some with a third column (a fitted background)
        pattern = read_pattern(path)
        assert (pattern.format, pattern.wavelength, pattern.path) == ("xy", None, path)
        np.testing.assert_array_equal(pattern.two_theta, raw[:, 0])
        np.testing.assert_array_equal(pattern.intensity, raw[:, 1])
        # 10-100 degrees at 0.01 (shared/data's README says 10-80; the files go on to 100)
        assert pattern.two_theta[0] == 10.0 and pattern.two_theta[-1] == 100.0 and pattern.two_theta.size == 9001


def mno_counts() -> tuple[np.ndarray, np.ndarray]:
    """Real counts (the MnO pattern of the pdCIF fixture, 30-50 degrees)."""
    pattern = read_pattern(PD_CIF)
    return pattern.two_theta, pattern.intensity


@pytest.mark.parametrize("row, sep", [
    ("{x:.3f};{y:.4f}", ";"),       # 35,000;0,1525  (Excel in a decimal-comma locale)
    ("{x:.3f} {y:.4f}", " "),       # 35,000 0,1525
    ("{x:.1f}\t{y:.4f}", "\t"),     # 35,0<TAB>0,1525
    ("{x:.3f} ; {y:.4f} ; 1", ";"),  # a third column, spaces around the separator
], ids=["semicolon", "space", "tab", "three-columns"])
def test_decimal_commas_are_read_as_decimals(tmp_path, row, sep):
    x, y = mno_counts()
    y = y / 1e4  # 0,1525 ... so both columns carry a decimal comma
    lines = ["2Theta" + sep + "Intensitaet", "# Messung: MnO"] + [row.format(x=a, y=b).replace(".", ",") for a, b in zip(x, y)]
    path = tmp_path / "mno.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    got = read_pattern(path)
    fmt = "{:.1f}" if "{x:.1f}" in row else "{:.3f}"
    np.testing.assert_allclose(got.two_theta, [float(fmt.format(a)) for a in x])
    np.testing.assert_allclose(got.intensity, [float(f"{b:.4f}") for b in y])
    assert got.two_theta.size == x.size and got.format == "csv"


def test_the_semicolon_example_is_35_and_five_hundredths(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("".join(f"{35 + i},000;0,05\n" for i in range(12)))
    got = read_pattern(path)
    assert got.two_theta[0] == 35.0 and got.intensity[0] == 0.05  # not 35 and 0, nor 0 and 5


def test_point_decimals_with_comma_separators_still_read(tmp_path):
    x, y = mno_counts()
    (tmp_path / "a.csv").write_text("two_theta,counts\n" + "".join(f"{a:.2f},{b:.1f}\n" for a, b in zip(x, y)))
    (tmp_path / "b.csv").write_text("".join(f"{a:.2f}, {b:.1f}\n" for a, b in zip(x, y)))
    for name in ("a.csv", "b.csv"):
        got = read_pattern(tmp_path / name)
        np.testing.assert_allclose(got.two_theta, x)
        np.testing.assert_allclose(got.intensity, y)


def test_ambiguous_or_mixed_decimal_separators_are_refused(tmp_path):
    ints = tmp_path / "ints.csv"  # "35,5": two integer columns, or one column with a decimal comma?
    ints.write_text("".join(f"{20 + i},{100 + i}\n" for i in range(30)))
    with pytest.raises(PatternRejected, match="two comma-separated integers") as exc:
        read_pattern(ints)
    one_sentence(exc)
    mixed = tmp_path / "mixed.dat"  # "1,234.5": thousands separators, or two decimal conventions
    mixed.write_text("".join(f"{20 + i}.5\t1,{200 + i}.5\n" for i in range(30)))
    with pytest.raises(PatternRejected, match="mix decimal points and decimal commas") as exc:
        read_pattern(mixed)
    one_sentence(exc)


def test_a_garbage_file_and_an_empty_file_say_why_in_one_sentence(tmp_path):
    empty = tmp_path / "empty.xy"
    empty.write_text("")
    with pytest.raises(PatternRejected, match="empty") as exc:
        read_pattern(empty)
    one_sentence(exc)
    binary = tmp_path / "scan.raw"
    binary.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(PatternRejected, match="binary") as exc:
        read_pattern(binary)
    one_sentence(exc)
    prose = tmp_path / "notes.txt"
    prose.write_text("This sample was measured on Tuesday.\nIt looked fine.\n")
    with pytest.raises(PatternRejected, match="no numeric") as exc:
        read_pattern(prose)
    assert "expected two numeric columns" in one_sentence(exc)
    with pytest.raises(PatternRejected) as exc:  # the same sentences through the grid
        measured_pattern(empty, XRDGrid())
    one_sentence(exc)


def test_a_wavelength_in_a_text_header_is_picked_up_and_the_given_one_is_a_default(tmp_path):
    x, y = mno_counts()
    body = "".join(f"{a:.2f} {b:.0f}\n" for a, b in zip(x, y))
    (tmp_path / "mo.xy").write_text("# wavelength = 0.70930 Angstrom\n# 2theta (deg), Intensity (counts)\n" + body)
    (tmp_path / "plain.xy").write_text(body)
    (tmp_path / "plain.xy.gz").write_bytes(gzip.compress(body.encode()))
    assert read_pattern(tmp_path / "mo.xy").wavelength == pytest.approx(0.7093)
    assert read_pattern(tmp_path / "mo.xy", wavelength="CuKa").wavelength == pytest.approx(0.7093)  # the file wins
    assert read_pattern(tmp_path / "plain.xy").wavelength is None
    assert read_pattern(tmp_path / "plain.xy", wavelength="MoKa").wavelength == pytest.approx(0.71073)
    assert read_pattern(tmp_path / "plain.xy", wavelength="1.5406").wavelength == pytest.approx(1.5406)
    np.testing.assert_allclose(read_pattern(tmp_path / "plain.xy.gz").intensity, np.round(y))


# ---------------------------------------------------------------------------------------------- xrdml


def test_a_real_xrdml_file_reads_its_scan_and_wavelength():
    pattern = read_pattern(XRDML)
    assert pattern.format == "xrdml"
    assert pattern.wavelength == pytest.approx(1.540598)  # ratioKAlpha2KAlpha1 0: K-alpha1 alone
    assert pattern.two_theta.size == 4999
    assert (pattern.two_theta[0], pattern.two_theta[-1]) == (5.015, pytest.approx(89.981))
    np.testing.assert_allclose(np.diff(pattern.two_theta), 0.017, atol=1e-9)
    # as PyPowder's own conversion of the same file (its tests/ASG1_1.xy) gives them
    np.testing.assert_array_equal(pattern.intensity[[0, 1, 2, 1000, -1]], [823, 720, 970, 160, 96])
    assert pattern.intensity.sum() == 1149417 and pattern.intensity.max() == 4659
    assert pattern.two_theta[np.argmax(pattern.intensity)] == pytest.approx(31.212)


def xrdml_variant(tmp_path: Path, name: str, **replace: str) -> Path:
    text = XRDML.read_text()
    for old, new in replace.items():
        old = old.replace("_", " ") if old.startswith("raw") else old
        assert text.count(replace_key(old)) == 1, old
        text = text.replace(replace_key(old), new)
    path = tmp_path / name
    path.write_text(text)
    return path


def replace_key(key: str) -> str:
    return {
        "ratio": "<ratioKAlpha2KAlpha1>0.000000</ratioKAlpha2KAlpha1>",
        "namespace": 'xmlns="http://www.xrdml.com/XRDMeasurement/1.5"',
        "positions": "<startPosition>5.015</startPosition>\n\t\t\t\t\t<endPosition>89.981</endPosition>",
        "intensities_open": '<intensities unit="counts">',
        "intensities_close": "</intensities>",
    }[key]


def test_xrdml_doublet_wavelength_list_positions_counts_and_attenuation(tmp_path):
    real = read_pattern(XRDML)
    listed = " ".join(f"{v:.3f}" for v in real.two_theta)
    counts = real.intensity.copy()
    counts[100:200] /= 10.0  # measured through a 10x attenuator there
    factors = np.ones_like(counts)
    factors[100:200] = 10.0
    path = xrdml_variant(
        tmp_path, "doublet.xrdml",
        ratio="<ratioKAlpha2KAlpha1>0.500000</ratioKAlpha2KAlpha1>",
        namespace='xmlns="http://www.xrdml.com/XRDMeasurement/1.0"',
        positions=f"<listPositions>{listed}</listPositions>",
        intensities_open='<beamAttenuationFactors>' + " ".join(f"{f:g}" for f in factors)
        + '</beamAttenuationFactors>\n<counts unit="counts">',
        intensities_close="</counts>",
    )
    path.write_text(path.read_text().replace(
        " ".join(f"{int(v)}" for v in real.intensity), " ".join(f"{v:g}" for v in counts)))
    got = read_pattern(path)
    assert got.wavelength == pytest.approx((1.540598 + 0.5 * 1.544426) / 1.5)
    assert got.wavelength == pytest.approx(CUKA, abs=1e-4)  # what pymatgen calls CuKa
    np.testing.assert_allclose(got.two_theta, real.two_theta, atol=5e-4)
    np.testing.assert_allclose(got.intensity, real.intensity)


def test_xml_with_entities_or_another_root_is_refused(tmp_path):
    bomb = tmp_path / "bomb.xrdml"
    bomb.write_text('<?xml version="1.0"?>\n<!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]>\n'
                    "<xrdMeasurements>&b;</xrdMeasurements>\n")
    with pytest.raises(PatternRejected, match="DOCTYPE") as exc:
        read_pattern(bomb)
    one_sentence(exc)
    other = tmp_path / "other.xrdml"
    other.write_text('<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"></svg>\n')
    with pytest.raises(PatternRejected, match="root is <svg>") as exc:
        read_pattern(other)
    one_sentence(exc)


# ------------------------------------------------------------------------------------------------- cif


def test_a_powder_cif_reads_its_counts_and_weighted_wavelength():
    pattern = read_pattern(PD_CIF)
    assert pattern.format == "cif" and is_pattern_cif(PD_CIF)
    assert pattern.wavelength == pytest.approx(CUKA, abs=1e-4)  # K-alpha1 : K-alpha2 weighted 1 : 0.5
    assert pattern.two_theta.size == 2001 and pattern.two_theta[0] == 30.0
    assert pattern.two_theta[-1] == pytest.approx(50.0)
    assert pattern.intensity[:3].tolist() == [1525, 1526, 1542]  # "1525(39)": the esd is dropped


def test_the_powder_cif_reads_back_identically_to_the_xy_it_carries(spectra):
    raw = np.loadtxt(spectra / "MnO.xy")
    part = raw[(raw[:, 0] > 29.995) & (raw[:, 0] < 50.005)]
    pattern = read_pattern(PD_CIF)
    np.testing.assert_allclose(pattern.two_theta, part[:, 0], atol=1e-9)
    np.testing.assert_array_equal(pattern.intensity, part[:, 1])


def test_a_powder_cif_with_a_scan_loop_and_one_wavelength(tmp_path):
    x, y = mno_counts()
    rows = [f"{a:.2f} {b:.0f}({np.sqrt(b):.0f}) {b * 0.9:.1f}" for a, b in zip(x, y)]
    rows[5] = f"{x[5]:.2f} ? ?"  # an unknown value is dropped
    path = tmp_path / "mo.cif"
    path.write_text("data_pattern\n_diffrn_radiation_wavelength 0.71073\nloop_\n_pd_meas_2theta_scan\n"
                    "_pd_meas_intensity_total\n_pd_calc_intensity_total\n" + "\n".join(rows) + "\n")
    got = read_pattern(path)
    assert got.wavelength == pytest.approx(0.71073) and got.two_theta.size == x.size - 1
    np.testing.assert_allclose(got.intensity, np.delete(y, 5))


def structure_cif(tmp_path: Path) -> Path:
    fcc = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    nacl = Structure(Lattice.cubic(5.64), ["Na"] * 4 + ["Cl"] * 4, np.vstack([fcc, fcc + [0.5, 0, 0]]))
    path = tmp_path / "NaCl.cif"
    nacl.to(filename=str(path))
    return path


def test_a_structure_cif_is_not_a_pattern_and_a_powder_cif_wins_over_the_structure_modality(tmp_path):
    from cmma_cli.embed_inputs import _claim
    from cmma_cli.modalities import REGISTRY

    structure = structure_cif(tmp_path)
    assert not is_pattern_cif(structure)
    with pytest.raises(PatternRejected, match="structure") as exc:
        read_pattern(structure)
    one_sentence(exc)
    xrd, struct = REGISTRY["xrd"], REGISTRY["structure"]
    assert (xrd.claim_input(structure), struct.claim_input(structure)) == (0, 2)
    assert xrd.claim_input(PD_CIF) > struct.claim_input(PD_CIF) == 2
    assert xrd.claim_input(XRDML) == 2
    assert (_claim(structure), _claim(PD_CIF), _claim(XRDML)) == ("structure", "xrd", "xrd")


# ------------------------------------------------------------------------------------------ wavelengths


def test_wavelength_conversion_follows_bragg():
    assert wavelength_angstrom("CuKa") == CUKA and wavelength_angstrom(" 0.7093 ") == 0.7093
    mo = convert_two_theta([30.0], "CuKa", "MoKa")[0]
    d = CUKA / (2 * np.sin(np.radians(15.0)))  # 2.98 A
    assert mo == pytest.approx(2 * np.degrees(np.arcsin(0.71073 / (2 * d))))
    assert mo == pytest.approx(13.70, abs=0.01)  # a 30 degree Cu line sits near 14 degrees with Mo
    assert convert_two_theta([mo], 0.71073, CUKA)[0] == pytest.approx(30.0)
    back = convert_two_theta([20.0, 40.0, 80.0], "MoKa", "CuKa")  # sin(40) * 2.17 > 1: no such Cu angle
    assert back[0] == pytest.approx(44.26, abs=0.01) and np.isnan(back[2])


def test_a_pattern_measured_with_another_wavelength_lands_where_the_grid_expects_it(tmp_path):
    grid = XRDGrid(two_theta_min=10.0, two_theta_max=60.0, step=0.02)
    cu = measured_pattern(PD_CIF, grid)  # CuKa file on a CuKa grid: no conversion
    x, y = mno_counts()
    mo_x = convert_two_theta(x, CUKA, "MoKa")
    path = tmp_path / "mo.xy"
    path.write_text("# Wavelength: 0.71073 A\n" + "".join(f"{a:.5f} {b:.0f}\n" for a, b in zip(mo_x, y)))
    mo = measured_pattern(path, grid)
    assert abs(grid.points[np.argmax(mo)] - grid.points[np.argmax(cu)]) <= grid.step
    assert abs(grid.points[np.argmax(cu)] - 40.6) < 0.1  # MnO (200)
    np.testing.assert_allclose(mo, cu, atol=0.05)
    as_given = measured_pattern(tmp_path / "mo.xy", grid, wavelength="CuKa")  # the file's own wavelength wins
    np.testing.assert_array_equal(as_given, mo)


# ------------------------------------------------------------------------------------------ background


def test_background_matches_the_fitted_one_and_keeps_peak_heights(spectra):
    for path in sorted(spectra.glob("*.xy")):
        raw = np.loadtxt(path)
        x, y = raw[:, 0], raw[:, 1]
        timings = []
        for _ in range(3):
            start = time.perf_counter()
            background = estimate_background(x, y)
            timings.append(time.perf_counter() - start)
        assert min(timings) < 0.05, path.name
        net = y - background
        top = int(np.argmax(y))
        # the raw background (300-2,000 counts, most of every point's counts) is gone: what is left between
        # peaks is ~1 % of the strongest peak
        assert np.median(background) > max(0.8 * np.median(y), 250), path.name
        assert abs(np.median(net)) < 0.015 * net[top], path.name
        # the strongest peak keeps its height above the local background (the 10th percentile 1-2 degrees away)
        near = (np.abs(x - x[top]) > 1.0) & (np.abs(x - x[top]) < 2.0)
        assert net[top] == pytest.approx(y[top] - np.percentile(y[near], 10), rel=0.03), path.name
        if raw.shape[1] > 2:  # the background the instrument software fitted
            fitted = raw[:, 2]
            assert np.median(np.abs(background - fitted)) < 0.03 * np.median(fitted), path.name
            assert net[top] == pytest.approx(y[top] - fitted[top], rel=0.01), path.name


def test_a_shared_measured_pattern_on_the_grid_has_a_zero_baseline(spectra):
    grid = XRDGrid()
    pattern = measured_pattern(spectra / "MnO.xy", grid)
    assert pattern.dtype == np.float32 and pattern.max() == pytest.approx(1.0) and pattern.min() >= 0.0
    assert abs(grid.points[np.argmax(pattern)] - 40.6) < 0.1
    inside = (grid.points > 10.5) & (grid.points < 79.5)
    assert np.median(pattern[inside]) < 0.004  # 0.0017; 0.0066 when the floor was the minimum (at 100 degrees)
