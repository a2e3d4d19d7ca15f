"""Fast powder XRD: the physics of pymatgen's ``XRDCalculator``, vectorised over all reflections at once.

The physics (kinematic diffraction, after De Graef & McHenry, *Structure of Materials*, ch. 11-12, as coded
in ``pymatgen.analysis.diffraction.xrd.XRDCalculator.get_pattern``):

1. Reciprocal points. With the real lattice vectors as the rows of ``A`` the crystallographic reciprocal
   lattice (no 2 pi) has rows ``B = inv(A).T``; a reflection (hkl) is ``g = h B``, its d-spacing ``1/|g|``.
   Every integer (hkl) with ``0 < |g| <= g_max`` is enumerated (the box ``|h| <= g_max |a|``, etc., holds the
   sphere, since ``h = g . a``). Friedel's law holds (the scattering factors are real), so only the half
   space with (h, k, l) lexicographically positive is computed and every intensity is doubled, as pymatgen
   does.
2. Atomic scattering factors, for every reflection and element at once, with ``s = |g| / 2 = sin(theta) /
   lambda``: ``f(s) = Z - 41.78214 s^2 sum_i a_i exp(-b_i s^2)`` (pymatgen's ``ATOMIC_SCATTERING_PARAMS``,
   four (a, b) pairs per element). Elements without parameters are refused (``ValueError``). Optional
   isotropic Debye-Waller factors ``{symbol: B}`` multiply ``f`` by ``exp(-B s^2)``; the site properties
   ``U11_cif ... U12_cif`` give pymatgen's anisotropic factor ``exp(-2 pi^2 h^T U* h)`` per site.
3. Structure factor ``F(g) = sum_j sum_{e on j} occ_je f_e(g) exp(2 pi i g . r_j)``: the phases of all
   reflections and sites are one (M, N) complex matrix, built as the product of per-axis tables
   ``exp(2 pi i h x_j) exp(2 pi i k y_j) exp(2 pi i l z_j)`` (a few hundred complex exponentials instead of
   M x N); times the (N, E) occupancy matrix (every species of a disordered site, vacancies as missing
   occupancy) it gives the per-element phase sums, weighted by ``f`` and summed over elements.
   ``I(g) = 2 |F|^2`` (the factor 2 is the dropped Friedel mate).
4. Lorentz-polarisation ``LP = (1 + cos^2 2theta) / (sin^2 theta cos theta)`` with Bragg's law
   ``sin theta = lambda |g| / 2``.
5. Reflections whose 2-theta round to the same multiple of ``TWO_THETA_TOL`` (1e-5 degrees) are one peak:
   intensities summed, the position that of its smallest-|g| member. Peaks at or below
   ``SCALED_INTENSITY_TOL`` (1e-3 %) of the strongest are dropped.

Wavelength-free form. Steps 1-3 do not depend on the wavelength. :func:`reflections` returns them as
d-spacings with ``|F|^2`` summed over the reflections sharing one d (to a relative 1e-12: the symmetry
equivalents, so ``|F|^2 x multiplicity``), without LP, extinct ones (below 1e-14 of the strongest) left out,
plus the cell volume and mass (for Hill-Howard weight fractions). :func:`two_theta_pattern` applies a
wavelength and a 2-theta range to them (steps 4-5); :func:`stick_pattern` is the two composed.

Equivalence with pymatgen. Merging equal d before the 2-theta binning changes nothing: reflections with
one d have one 2-theta and one LP, so the same bins collect the same intensity, and the bins are then
formed exactly as pymatgen forms them, so near-coincident reflections of different d are merged (or not)
as pymatgen merges them. The d tolerance is that tight on purpose: cell parameters rounded in a CIF break
pseudo-symmetries at ~1e-9 relative, and pymatgen splits such a pair into two peaks 2e-8 degrees apart when
a bin boundary falls between them (9 of the 1,130 MP-20 sample structures); merging by d at 1e-9 would
differ from pymatgen there. So ``stick_pattern(structure, wavelength, two_theta_range)`` gives the ``x`` and
``y`` of ``XRDCalculator(wavelength).get_pattern(structure, scaled=False, two_theta_range=...)``: the same
peaks, intensities equal to ~1e-12 relative. One deliberate difference: extinct reflections are left out,
so a merged peak sits at its smallest-|g| non-extinct member, where pymatgen's may sit at an extinct member
of the same bin, less than 1e-5 degrees lower (a weak peak or two in 9 of the 1,130 structures; all other
positions agree to ~1e-12 degrees). pymatgen's ``symprec`` refinement is left to the caller. What pymatgen
spends its time on, hkl family bookkeeping and a Python loop over reflections, is not needed for positions
and intensities and is not done.
"""

from __future__ import annotations

import ast
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# pymatgen's values, read on first use (module attributes of the same names, see ``__getattr__``):
#: ``TWO_THETA_TOL``: peaks whose 2-theta (degrees) round to the same multiple of this are one peak;
#: ``SCALED_INTENSITY_TOL``: peaks at or below this percentage of the strongest are dropped;
#: ``WAVELENGTHS``: the X-ray sources by name (angstrom); ``ATOMIC_SCATTERING_PARAMS``: per element, four (a, b).
PYMATGEN_CONSTANTS = ("TWO_THETA_TOL", "SCALED_INTENSITY_TOL", "WAVELENGTHS", "ATOMIC_SCATTERING_PARAMS")
#: Reflections whose |g| agree to this relative tolerance share one d-spacing (symmetry equivalents).
D_MERGE_RTOL = 1e-12
#: Reflections with |F|^2 below this fraction of the strongest are extinct (systematic absences, rounding noise
#: ~1e-30): left out of :func:`reflections`. Even a 1e5 Lorentz-polarisation ratio keeps them far below
#: SCALED_INTENSITY_TOL, so patterns do not change.
EXTINCT_RTOL = 1e-14



@functools.cache
def pymatgen_constants() -> dict[str, Any]:
    """pymatgen's diffraction constants (:data:`PYMATGEN_CONSTANTS`), read from the files of
    ``pymatgen.analysis.diffraction`` without importing it: its ``core`` imports matplotlib.pyplot and scipy.stats
    (1-3 s), which reading a measured pattern has no use for. The same values as the imported ones (the literals of
    ``xrd.WAVELENGTHS`` and ``core.AbstractDiffractionPatternCalculator``, the JSON file ``xrd`` loads); imported
    when the files cannot be read so."""
    try:
        return _read_pymatgen_constants()
    except Exception:  # another pymatgen layout: import it
        from pymatgen.analysis.diffraction.core import AbstractDiffractionPatternCalculator as calculator
        from pymatgen.analysis.diffraction.xrd import ATOMIC_SCATTERING_PARAMS, WAVELENGTHS

        return {"TWO_THETA_TOL": calculator.TWO_THETA_TOL, "SCALED_INTENSITY_TOL": calculator.SCALED_INTENSITY_TOL,
                "WAVELENGTHS": WAVELENGTHS, "ATOMIC_SCATTERING_PARAMS": ATOMIC_SCATTERING_PARAMS}


def _read_pymatgen_constants() -> dict[str, Any]:
    import importlib.util
    import json

    spec = importlib.util.find_spec("pymatgen.analysis.diffraction")
    folder = Path(next(iter(spec.submodule_search_locations)))

    def literals(path: Path, names: tuple[str, ...], class_name: str | None = None) -> dict[str, Any]:
        """The literal values assigned to ``names`` at the top of the file (or of its class ``class_name``)."""
        body = ast.parse(path.read_text(encoding="utf-8")).body
        if class_name is not None:
            body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == class_name).body
        return {t.id: ast.literal_eval(n.value) for n in body if isinstance(n, ast.Assign)
                for t in n.targets if isinstance(t, ast.Name) and t.id in names}

    out = {**literals(folder / "core.py", ("TWO_THETA_TOL", "SCALED_INTENSITY_TOL"),
                      "AbstractDiffractionPatternCalculator"),
           **literals(folder / "xrd.py", ("WAVELENGTHS",)),
           "ATOMIC_SCATTERING_PARAMS": json.loads((folder / "atomic_scattering_params.json").read_bytes())}
    if not (isinstance(out["WAVELENGTHS"], dict) and isinstance(out["ATOMIC_SCATTERING_PARAMS"], dict)
            and all(isinstance(out[k], float) for k in ("TWO_THETA_TOL", "SCALED_INTENSITY_TOL"))):
        raise ValueError("unexpected pymatgen constants")
    return out


def __getattr__(name: str) -> Any:
    if name in PYMATGEN_CONSTANTS:
        return pymatgen_constants()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Per element with scattering parameters: its row in the tables below (filled on first use).
_ROW: dict[str, int] = {}
_TABLES: dict[str, np.ndarray] = {}


def _tables() -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """Z, mass (amu) and the (4, 2) scattering parameters of every element pymatgen has parameters for."""
    if not _ROW:
        from pymatgen.core import Element

        params = pymatgen_constants()["ATOMIC_SCATTERING_PARAMS"]
        symbols = sorted(params)
        _TABLES["z"] = np.array([Element(sym).Z for sym in symbols], dtype=float)
        _TABLES["mass"] = np.array([float(Element(sym).atomic_mass) for sym in symbols])
        _TABLES["coeff"] = np.array([params[sym] for sym in symbols], dtype=float)
        _ROW.update({sym: i for i, sym in enumerate(symbols)})
    return _ROW, _TABLES


def wavelength_angstrom(value: Any) -> float:
    """A wavelength in angstrom from a pymatgen name (``"CuKa"``, ``"MoKa1"``, ...) or a number (string) in angstrom."""
    wavelengths = pymatgen_constants()["WAVELENGTHS"]
    if isinstance(value, str):
        name = value.strip()
        if name in wavelengths:
            return float(wavelengths[name])
        try:
            number = float(name)
        except ValueError:
            number = None
    elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        number = float(value)
    else:
        number = None
    if number is None or not (math.isfinite(number) and number > 0):
        raise ValueError(
            f"The X-ray wavelength {value!r} is not known: give a positive number in angstrom or one of "
            f"{', '.join(sorted(wavelengths))}."
        )
    return number


@dataclass(frozen=True)
class Reflections:
    """The wavelength-free powder reflections of one structure, largest d first, extinct ones left out.

    ``d``: d-spacings (angstrom), descending, each distinct to a relative 1e-12; ``intensity``: ``|F|^2`` summed
    over the reflections with that d (``|F|^2 x multiplicity``), no Lorentz-polarisation; ``multiplicity``: how
    many (hkl) share the d (Friedel mates included); ``volume``: cell volume (angstrom^3); ``mass``: cell mass
    (amu, occupancy weighted); ``d_min``: the smallest d looked for.
    """

    d: np.ndarray
    intensity: np.ndarray
    multiplicity: np.ndarray
    volume: float
    mass: float
    d_min: float


def _occupancies(structure) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The (N, E) occupancy matrix (every species of every site), the E elements' table rows and symbols."""
    rows, tables = _tables()
    index: dict[str, int] = {}
    flat, occus = [], []
    for site_idx, site in enumerate(structure):
        for sp, occu in site.species.items():
            symbol = sp.symbol
            col = index.get(symbol)
            if col is None:
                if symbol not in rows:
                    raise ValueError(
                        f"Unable to calculate XRD pattern as there is no scattering coefficients for {symbol}."
                    )
                col = index[symbol] = len(index)
            flat.append(site_idx * 0x10000 + col)
            occus.append(occu)
    n, e = len(structure), len(index)
    keys = np.asarray(flat, dtype=np.int64)
    keys = (keys >> 16) * e + (keys & 0xFFFF)
    occupancy = np.bincount(keys, np.asarray(occus, dtype=float), minlength=n * e).reshape(n, e)
    return occupancy, np.array([rows[sym] for sym in index], dtype=np.int64), list(index)


def _half_space_hkl(
    inv_t: np.ndarray, matrix: np.ndarray, g_max: float
) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray]:
    """The reflections (hkl), lexicographically positive, with 0 < |g| <= g_max, sorted by |g|.

    Returns the bounds (hb, kb, lb) of the box searched (0 <= h <= hb, |k| <= kb, |l| <= lb), the (M, 3) box
    indices (h, k + kb, l + lb) of the reflections, and their |g|.
    """
    bounds = np.floor(g_max * np.sqrt(np.einsum("ij,ij->i", matrix, matrix)) + 1e-9).astype(int).tolist()
    hb, kb, lb = bounds
    metric = inv_t @ inv_t.T  # |g|^2 = (hkl) G (hkl)^T
    h = np.arange(0, hb + 1, dtype=float)
    k = np.arange(-kb, kb + 1, dtype=float)
    l = np.arange(-lb, lb + 1, dtype=float)
    hk = (metric[0, 0] * h * h)[:, None] + (metric[1, 1] * k * k)[None, :] + 2 * metric[0, 1] * np.outer(h, k)
    hl = 2 * metric[0, 2] * np.outer(h, l)
    kl = (metric[2, 2] * l * l)[None, :] + 2 * metric[1, 2] * np.outer(k, l)
    g2 = hk[:, :, None] + hl[:, None, :] + kl[None, :, :]  # (h, k, l)
    inside = g2 <= g_max * g_max
    inside[0, :kb] = False  # h = 0: keep k > 0, or k = 0 and l > 0 (one Friedel half-space)
    inside[0, kb, : lb + 1] = False
    box = np.argwhere(inside)  # (M, 3), C order
    g = np.sqrt(g2[inside])
    order = np.argsort(g)  # the order among exactly equal |g| does not matter
    return (hb, kb, lb), box[order], g[order]


def _phases(bounds: tuple[int, int, int], box: np.ndarray, frac_coords: np.ndarray) -> np.ndarray:
    """exp(2 pi i (hkl) . r) for all reflections and sites, (M, N): the product of per-axis tables
    exp(2 pi i h x) exp(2 pi i k y) exp(2 pi i l z), each computed directly (far fewer sines than M x N)."""
    hb, kb, lb = bounds
    index = np.concatenate((np.arange(0, hb + 1), np.arange(-kb, kb + 1), np.arange(-lb, lb + 1)))
    axis = np.repeat(np.arange(3), (hb + 1, 2 * kb + 1, 2 * lb + 1))
    table = np.exp((2j * math.pi) * (index[:, None] * frac_coords.T[axis]))  # (rows, N)
    return table[box[:, 0]] * table[box[:, 1] + (hb + 1)] * table[box[:, 2] + (hb + 2 * kb + 2)]


def _ustar(structure) -> np.ndarray | None:
    if "U11_cif" not in structure.site_properties:
        return None
    from pymatgen.analysis.diffraction.core import get_ustar

    return get_ustar(structure)


def reflections(structure, d_min: float, debye_waller_factors: dict[str, float] | None = None) -> Reflections:
    """All powder reflections of ``structure`` with d >= ``d_min`` (angstrom): d, ``|F|^2 x multiplicity``, and
    the cell's volume and mass. ``ValueError`` for an element without scattering parameters."""
    if not d_min > 0:
        raise ValueError("d_min must be positive")
    occupancy, rows, symbols = _occupancies(structure)
    _, tables = _tables()
    z, coeff = tables["z"][rows], tables["coeff"][rows]
    mass = float(occupancy.sum(axis=0) @ tables["mass"][rows])
    ustar = _ustar(structure)
    if ustar is not None and debye_waller_factors:
        raise ValueError("debye_waller_factors cannot be used with the U11_cif, ..., U12_cif site properties.")
    lattice = structure.lattice
    matrix = lattice.matrix
    inv_t = lattice.inv_matrix.T  # rows: the crystallographic reciprocal vectors a*, b*, c*
    bounds, box, g = _half_space_hkl(inv_t, matrix, 1.0 / d_min)
    empty = np.zeros(0)
    if g.size == 0:
        return Reflections(empty, empty, np.zeros(0, dtype=np.int64), float(lattice.volume), mass, float(d_min))

    # reflections sharing one d (g sorted ascending): one scattering factor computation per d
    starts = _run_starts(np.diff(g) > D_MERGE_RTOL * g[1:])
    counts = np.diff(np.append(starts, g.size))
    s2 = (g[starts] / 2) ** 2  # (D,)
    # f(s) = Z - 41.78214 s^2 sum a exp(-b s^2), for all (d, element): (D, E)
    fs = z - 41.78214 * s2[:, None] * np.einsum(
        "mek,ek->me", np.exp(-coeff[None, :, :, 1] * s2[:, None, None]), coeff[:, :, 0]
    )
    if debye_waller_factors:
        b = np.array([debye_waller_factors.get(symbol, 0.0) for symbol in symbols], dtype=float)
        fs = fs * np.exp(-b[None, :] * s2[:, None])
    phase = _phases(bounds, box, structure.frac_coords)  # (M, N)
    if ustar is not None:
        hklf = (box - [0, bounds[1], bounds[2]]).astype(float)
        phase *= np.exp(-2 * np.pi**2 * np.einsum("mi,nij,mj->mn", hklf, ustar, hklf))
    # F = sum over elements of f_e times the occupancy-weighted phase sum of the element's sites
    f_hkl = np.einsum("me,me->m", phase @ occupancy, np.repeat(fs, counts, axis=0))
    intensity = 2.0 * (f_hkl.real**2 + f_hkl.imag**2)  # x 2: the Friedel mate
    summed = np.add.reduceat(intensity, starts)
    counts = 2 * counts
    real = summed > EXTINCT_RTOL * summed.max()
    return Reflections(1.0 / g[starts][real], summed[real], counts[real], float(lattice.volume), mass, float(d_min))


def _run_starts(new: np.ndarray) -> np.ndarray:
    """Indices starting a run, from ``new[i]``: element i + 1 starts one (element 0 always does)."""
    later = np.flatnonzero(new)
    starts = np.empty(later.size + 1, dtype=np.int64)
    starts[0] = 0
    starts[1:] = later + 1
    return starts


def _g_range(wavelength: float, two_theta_range: tuple[float, float] | None) -> tuple[float, float]:
    if two_theta_range is None:
        return 0.0, 2.0 / wavelength
    lo, hi = (2 * math.sin(math.radians(t / 2)) / wavelength for t in two_theta_range)
    return lo, hi


def two_theta_pattern(
    refl: Reflections, wavelength: Any = "CuKa", two_theta_range: tuple[float, float] | None = (0, 90)
) -> tuple[np.ndarray, np.ndarray]:
    """Stick positions (2-theta, degrees) and unscaled intensities of ``refl`` at ``wavelength`` (a name or
    angstrom): ``x`` and ``y`` of pymatgen's ``get_pattern(scaled=False, two_theta_range=...)``. Empty arrays when
    no reflection falls in the range."""
    lam = wavelength_angstrom(wavelength)
    g_lo, g_hi = _g_range(lam, two_theta_range)
    if g_hi > 0 and 1.0 / g_hi < refl.d_min * (1 - 1e-12):
        raise ValueError(
            f"The reflections go down to d = {refl.d_min:.4g} A only; this range needs d = {1 / g_hi:.4g} A."
        )
    g = 1.0 / refl.d
    keep = (g <= g_hi) & (g >= g_lo) if g_lo else g <= g_hi
    g, intensity = g[keep], refl.intensity[keep]
    if g.size == 0:
        return np.zeros(0), np.zeros(0)
    theta = np.arcsin(np.clip(lam * g / 2, -1, 1))
    cos2t, sint, cost = np.cos(2 * theta), np.sin(theta), np.cos(theta)
    y = intensity * (1 + cos2t**2) / (sint**2 * cost)
    two_theta = np.degrees(2 * theta)
    keys = np.round(two_theta / pymatgen_constants()["TWO_THETA_TOL"]).astype(np.int64)  # non-decreasing, as g ascends
    starts = _run_starts(np.diff(keys) != 0)
    x, y = two_theta[starts], np.add.reduceat(y, starts)
    strong = y / y.max() * 100 > pymatgen_constants()["SCALED_INTENSITY_TOL"]
    return x[strong], y[strong]


def stick_pattern(
    structure,
    wavelength: Any = "CuKa",
    two_theta_range: tuple[float, float] | None = (0, 90),
    debye_waller_factors: dict[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``XRDCalculator(wavelength, debye_waller_factors=...).get_pattern(structure, scaled=False,
    two_theta_range=...)``'s ``x`` and ``y``, computed fast. ``ValueError`` for an element without scattering
    parameters or an unknown wavelength."""
    lam = wavelength_angstrom(wavelength)
    _, g_hi = _g_range(lam, two_theta_range)
    if not g_hi > 0:
        return np.zeros(0), np.zeros(0)
    return two_theta_pattern(reflections(structure, 1.0 / g_hi, debye_waller_factors), lam, two_theta_range)
