"""Structure helpers every source shares: parse a CIF, and turn a structure into a raw materials row."""

from __future__ import annotations

import os
import warnings
from typing import Any

# spglib prints C-level warnings to stderr for hard cells; symmetry failures are handled below instead.
os.environ.setdefault("SPGLIB_WARNING", "OFF")

from pymatgen.core import Structure  # noqa: E402
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer  # noqa: E402

#: Symmetry tolerance (Angstrom) when a source does not give the space group itself.
SYMPREC = 0.1
#: Structures with more sites get no computed symmetry (it stays null): spglib would take minutes, and
#: ``cmma preprocess`` rejects them by default anyway (``--max-sites``).
SYMMETRY_MAX_SITES = 1000


#: pymatgen's warnings that the parsed structure is not the material the CIF states (its formula check).
_STOICHIOMETRY_WARNINGS = ("Incorrect stoichiometry", "Missing elements")


def _structure_blocks(text: str) -> list[str]:
    """The names of the CIF's data blocks that hold atom sites (one per structure or refined phase)."""
    from pymatgen.io.cif import CifFile

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = CifFile.from_str(text).data
    except Exception:  # the structure parser below says what is wrong
        return []
    return [name for name, block in data.items()
            if any(k in block.data for k in ("_atom_site_fract_x", "_atom_site_Cartn_x", "_atom_site_cartn_x"))]


def parse_cif(text: str) -> Structure:
    """Parse one CIF into a structure; raises ``ValueError`` with a short reason when it cannot.

    A CIF holding several structures (data blocks with atoms: phases of a refinement) is refused rather than
    cut to its first one, and so is one whose atoms disagree with its own ``_chemical_formula_sum`` (pymatgen's
    stoichiometry check: missing elements, other ratios), which is a different material from the one it names.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty CIF")
    blocks = _structure_blocks(text)
    if len(blocks) > 1:
        shown = ", ".join(blocks[:4]) + (", ..." if len(blocks) > 4 else "")
        raise ValueError(f"the CIF holds {len(blocks)} structures (data blocks {shown}) and cmma reads one per CIF: "
                         "split it into one file per phase")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            structure = Structure.from_str(text, fmt="cif")
    except Exception as exc:  # pymatgen raises many types for bad CIFs
        raise ValueError(f"unparsable CIF ({type(exc).__name__}: {str(exc).strip()[:120] or 'no detail'})") from exc
    if len(structure) == 0:
        raise ValueError("CIF has no atoms")
    for warning in caught:
        message = str(warning.message)
        if message.startswith(_STOICHIOMETRY_WARNINGS):
            detail = " ".join(message.split())
            raise ValueError(f"the atoms ({structure.composition.reduced_formula}) disagree with the CIF's stated "
                             f"formula ({detail[:160]})")
    return structure


def material_record(material_id: str, structure: Structure, source: str, **properties: Any) -> dict[str, Any]:
    """A raw materials row for ``structure``.

    Symmetry (crystal system, space group) and density are computed from the structure when the
    caller does not pass them; every other property stays as given (or absent, which becomes null).
    """
    row: dict[str, Any] = {
        "material_id": str(material_id),
        "formula": structure.composition.reduced_formula,
        "elements": sorted(el.symbol for el in structure.composition.elements),
        "nsites": len(structure),
        "structure": structure.to_json(),
        "source": source,
    }
    needs_symmetry = _missing(properties.get("spacegroup_number")) or _missing(properties.get("crystal_system"))
    if needs_symmetry and len(structure) <= SYMMETRY_MAX_SITES:  # spglib takes ~30 s on a 10,000-site cell
        try:
            with warnings.catch_warnings():  # spglib's deprecation notices, once per call
                warnings.simplefilter("ignore", DeprecationWarning)
                sga = SpacegroupAnalyzer(structure, symprec=SYMPREC)
                symmetry = {
                    "spacegroup_number": sga.get_space_group_number(),
                    "spacegroup_symbol": sga.get_space_group_symbol(),
                    "crystal_system": sga.get_crystal_system(),
                }
        except Exception:  # spglib fails on a few pathological cells: symmetry stays null
            symmetry = {}
        for key, value in symmetry.items():
            if _missing(properties.get(key)):
                properties[key] = value
    if _missing(properties.get("density")):
        properties["density"] = float(structure.density)
    row.update(properties)
    return row


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)
