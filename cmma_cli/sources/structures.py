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


def parse_cif(text: str) -> Structure:
    """Parse one CIF into a structure; raises ``ValueError`` with a short reason when it cannot."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty CIF")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structure = Structure.from_str(text, fmt="cif")
    except Exception as exc:  # pymatgen raises many types for bad CIFs
        raise ValueError(f"unparsable CIF ({type(exc).__name__}: {str(exc).strip()[:120] or 'no detail'})") from exc
    if len(structure) == 0:
        raise ValueError("CIF has no atoms")
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
    if _missing(properties.get("spacegroup_number")) or _missing(properties.get("crystal_system")):
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
