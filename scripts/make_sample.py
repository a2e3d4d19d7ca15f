"""Build the built-in sample that ``cmma fetch`` uses when it has no API key and no local source.

The sample is a table of REAL crystal structures that pymatgen ships, each with a Robocrystallographer
description and, where a real value exists, an experimental formation enthalpy. Nothing in it is
invented: a structure robocrys cannot describe is left out (and counted), and a property no source
gives stays null.

Structures (``collection`` column):

``aflow``
    All 288 entries of the AFLOW Library of Crystallographic Prototypes as pymatgen ships it
    (``pymatgen/analysis/prototypes/aflow_prototypes.json.gz``, Mehl et al., Comput. Mater. Sci. 136,
    S1 (2017)). Each is an experimentally reported structure; the AFLOW tags (label, Pearson symbol,
    Strukturbericht, mineral name) and the original literature reference (BibTeX) are kept.
    ``material_id`` is ``aflow:<AFLOW label>:<reduced formula>`` (a few labels are shared by several
    compounds, so the formula makes the id unique and stable).

``pymatgen``
    The structures in ``pymatgen/util/structures/`` that are ordinary bulk cells of known compounds.
    Two carry their Materials Project id in their history (TiO2 ``mp-554278``, VO2 ``mp-19094``) and
    keep it as ``material_id``; the others are ``pymatgen:<file stem>``. Left out, with the reason in
    :data:`EXCLUDED_UTIL`: model cells that are not a compound's real structure, and any cell that
    duplicates an AFLOW structure (pymatgen ``StructureMatcher``).

Properties: ``pymatgen/analysis/compatibility/exp_compounds.json.gz`` lists 2,135 experimental
standard formation enthalpies (298 K) in eV per formula unit, keyed by formula and MP id (pymatgen's
``CorrectionCalculator`` documents the unit). Divided by the atoms per formula unit this is a
formation enthalpy per atom, stored as ``formation_energy_per_atom`` (eV/atom), with its experimental
uncertainty as ``formation_enthalpy_uncertainty`` (eV/atom) and the MP id it is keyed to as
``exp_mp_id``. A value is attached only when the match is unambiguous: a structure that carries an
MP id matches only the entry with that id; any other structure matches by reduced formula only when
exactly one experimental entry and exactly one sample structure have that formula, and not when the
AFLOW tags name a high-pressure or high-temperature phase (:func:`_non_ambient`). The enthalpy is the
compound's at 298 K, i.e. of its stable form; on the few AFLOW structures that are a metastable
polymorph it differs from that polymorph's own by the polymorph energy difference (typically a few
hundredths of an eV/atom), which the source cannot resolve.

Descriptions: robocrys's default condenser and describer, as its command-line tool runs them
(oxidation states guessed when the structure has none), with PubChem look-ups switched off (no
network). robocrys pins ``pandas<3``, so this script runs in its own virtual environment::

    python3 -m venv /tmp/robovenv
    /tmp/robovenv/bin/pip install robocrys pyarrow -c /tmp/constraints.txt
    /tmp/robovenv/bin/python scripts/make_sample.py   # 2 workers; 39 min on a busy 2-core machine

It writes ``cmma_cli/data/sample_materials.parquet`` (zstd); the Parquet schema metadata key
``cmma_sample`` records the versions used, the time taken, and every structure left out with why.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import multiprocessing as mp
import signal
import socket
import sys
import time
import warnings
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pymatgen.analysis.compatibility as compat_pkg
import pymatgen.analysis.prototypes as prototypes_pkg
import pymatgen.util as util_pkg
from monty.serialization import loadfn
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Composition, Structure

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "cmma_cli" / "data" / "sample_materials.parquet"

AFLOW_FILE = Path(prototypes_pkg.__path__[0]) / "aflow_prototypes.json.gz"
UTIL_DIR = Path(util_pkg.__path__[0]) / "structures"
EXP_FILE = Path(compat_pkg.__path__[0]) / "exp_compounds.json.gz"

#: pymatgen/util/structures files left out, and why (checked by hand against the known phases).
EXCLUDED_UTIL: dict[str, str] = {
    "He_BCC": "a one-atom bcc helium test cell carrying test forces, not a characterised phase",
    "La2CoO4F": "a fluorine-intercalated La2CoO4 model from battery-analysis tests, no known source",
    "Li3V2(PO4)3": "C2 cell of 40 sites; the known phases are P2_1/n (80 sites) and R-3",
    "Pb2TiZrO6": "an ordered model of the PZT solid solution, not a compound",
    "Si_SiO2_Interface": "an interface model with vacuum, not a bulk material",
    "TlBiSe2": "a P4/mmm cell with c = 43 Angstrom (a slab-like supercell); the known phase is R-3m",
}

#: Seconds robocrys may spend on one structure before it counts as a failure.
DEFAULT_TIMEOUT = 300


def aflow_structures() -> list[dict[str, Any]]:
    """Every AFLOW prototype pymatgen ships, with its tags and literature reference."""
    rows = []
    with gzip.open(AFLOW_FILE, "rt") as fh:
        entries = json.load(fh)
    for entry in entries:
        snl = entry["snl"]
        structure = Structure.from_dict(snl)
        tags = entry["tags"]
        formula = structure.composition.reduced_formula
        rows.append(
            {
                "material_id": f"aflow:{tags['aflow']}:{formula}",
                "collection": "aflow",
                "structure": structure,
                "aflow_label": tags["aflow"],
                "pearson_symbol": tags.get("pearson") or None,
                "strukturbericht": _tag(tags.get("strukturbericht")),
                "mineral": _tag(tags.get("mineral")),
                "reference": snl.get("about", {}).get("references") or None,
                "origin": "pymatgen/analysis/prototypes/aflow_prototypes.json.gz",
                "mp_id": None,
            }
        )
    ids = [r["material_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise RuntimeError("AFLOW material ids are not unique")
    return rows


def _tag(value: Any) -> str | None:
    text = str(value).strip() if value is not None else ""
    return None if text in {"", "None"} else text


def util_structures(aflow: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """pymatgen's bundled bulk structures that are real compounds and not already in ``aflow``."""
    matcher = StructureMatcher()
    rows, left_out = [], []
    for path in sorted(UTIL_DIR.glob("*.json")):
        stem = path.stem
        if stem in EXCLUDED_UTIL:
            left_out.append({"item": f"pymatgen/util/structures/{path.name}", "reason": EXCLUDED_UTIL[stem]})
            continue
        obj = loadfn(path)
        mp_id = None
        if hasattr(obj, "final_structure"):  # a TransformedStructure whose history names its MP id
            mp_id = next((h.get("materialsid") for h in obj.history if h.get("materialsid")), None)
            obj = obj.final_structure
        structure = Structure.from_sites(obj.sites)  # drop Interface/Slab extras, keep species and sites
        same = [
            a["material_id"]
            for a in aflow
            if a["structure"].composition.reduced_formula == structure.composition.reduced_formula
            and structure.is_ordered
            and matcher.fit(a["structure"], structure)
        ]
        if same:
            left_out.append({"item": f"pymatgen/util/structures/{path.name}", "reason": f"same structure as {same[0]}"})
            continue
        rows.append(
            {
                "material_id": mp_id or f"pymatgen:{stem}",
                "collection": "pymatgen",
                "structure": structure,
                "aflow_label": None,
                "pearson_symbol": None,
                "strukturbericht": None,
                "mineral": None,
                "reference": None,
                "origin": f"pymatgen/util/structures/{path.name}",
                "mp_id": mp_id,
            }
        )
    return rows, left_out


def attach_formation_enthalpies(rows: list[dict[str, Any]]) -> int:
    """Set the experimental formation enthalpy (eV/atom) on rows whose match is unambiguous; return how many."""
    with gzip.open(EXP_FILE, "rt") as fh:
        exp = json.load(fh)
    by_formula: dict[str, list[dict[str, Any]]] = {}
    by_mpid: dict[str, dict[str, Any]] = {}
    for entry in exp:
        by_formula.setdefault(Composition(entry["formula"]).reduced_formula, []).append(entry)
        if entry.get("mpid"):
            by_mpid[entry["mpid"]] = entry
    sample_count: dict[str, int] = {}
    for row in rows:
        f = row["structure"].composition.reduced_formula
        sample_count[f] = sample_count.get(f, 0) + 1
    attached = 0
    for row in rows:
        formula = row["structure"].composition.reduced_formula
        if row["mp_id"]:
            entry = by_mpid.get(row["mp_id"])
        elif (
            len(by_formula.get(formula, [])) == 1
            and sample_count[formula] == 1
            and not _non_ambient(row)
        ):
            entry = by_formula[formula][0]
        else:
            entry = None
        row["formation_energy_per_atom"] = None
        row["formation_enthalpy_uncertainty"] = None
        row["exp_mp_id"] = None
        if entry is None:
            continue
        atoms = Composition(entry["formula"]).num_atoms
        row["formation_energy_per_atom"] = float(entry["exp energy"]) / atoms
        row["formation_enthalpy_uncertainty"] = float(entry["uncertainty"]) / atoms
        row["exp_mp_id"] = entry.get("mpid")
        attached += 1
    return attached


#: AFLOW prototypes of a compound's non-ambient phase that no tag word below gives away.
NON_AMBIENT_LABELS: dict[str, str] = {"AB_tP8_136_g_f": "beta-BeO, stable only above about 2100 C"}


def _non_ambient(row: dict[str, Any]) -> bool:
    """True when the AFLOW tags say the structure is a high-pressure or high-temperature phase."""
    tag = (row["mineral"] or "").lower()
    return row["aflow_label"] in NON_AMBIENT_LABELS or any(w in tag for w in ("pressure", "gpa", "high"))


def _init_worker() -> None:
    """Per worker: no network (robocrys would ask PubChem for molecule names), and no warnings noise."""
    from robocrys.condense import condenser
    from robocrys.condense.molecule import MoleculeNamer

    condenser.MoleculeNamer = functools.partial(MoleculeNamer, use_online_pubchem=False)

    def _refuse(*_args: Any, **_kwargs: Any) -> None:
        raise OSError("network access is disabled while generating the sample")

    socket.socket.connect = _refuse  # type: ignore[method-assign]
    warnings.simplefilter("ignore")


class _Timeout(Exception):
    pass


def _on_alarm(_signum: int, _frame: Any) -> None:
    raise _Timeout


def describe(job: tuple[str, str, int]) -> tuple[str, str | None, str | None, float]:
    """Robocrys description of one structure (JSON): ``(material_id, text, error, seconds)``."""
    from robocrys import StructureCondenser, StructureDescriber

    material_id, structure_json, timeout = job
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(timeout)
    try:
        structure = Structure.from_dict(json.loads(structure_json))
        if not any(hasattr(el, "oxi_state") for el in structure.composition.elements):
            try:
                structure.add_oxidation_state_by_guess(max_sites=-80)
            except ValueError:
                pass  # robocrys describes the structure without oxidation states
        condensed = StructureCondenser().condense_structure(structure)
        text = StructureDescriber().describe(condensed)
        text = " ".join(str(text).split())
        if not text:
            return material_id, None, "robocrys returned an empty description", time.perf_counter() - start
        return material_id, text, None, time.perf_counter() - start
    except _Timeout:
        return material_id, None, f"robocrys took longer than {timeout} s", time.perf_counter() - start
    except Exception as exc:  # robocrys raises many types on structures it cannot condense
        reason = f"robocrys failed ({type(exc).__name__}: {str(exc).strip()[:160]})"
        return material_id, None, reason, time.perf_counter() - start
    finally:
        signal.alarm(0)


def main(argv: list[str] | None = None) -> int:
    """Collect, describe and write the sample table; print a summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Parquet file to write")
    parser.add_argument("--workers", type=int, default=2, help="processes running robocrys")
    parser.add_argument("--limit", type=int, default=0, help="describe only the first N structures (a trial)")
    parser.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT, help="seconds allowed per structure")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    aflow = aflow_structures()
    util, left_out = util_structures(aflow)
    rows = aflow + util
    if args.limit:
        rows = rows[: args.limit]
    attached = attach_formation_enthalpies(rows)
    print(f"{len(aflow)} AFLOW + {len(util)} pymatgen structures; {len(left_out)} pymatgen files left out; "
          f"{attached} with an experimental formation enthalpy", flush=True)

    jobs = [(r["material_id"], r["structure"].to_json(), args.timeout) for r in rows]
    texts: dict[str, str] = {}
    failures: list[dict[str, str]] = []
    seconds: list[float] = []
    with mp.get_context("fork").Pool(args.workers, initializer=_init_worker, maxtasksperchild=25) as pool:
        for i, (material_id, text, error, took) in enumerate(pool.imap_unordered(describe, jobs), 1):
            seconds.append(took)
            if text is None:
                failures.append({"item": material_id, "reason": str(error)})
                print(f"  FAILED {material_id}: {error}", flush=True)
            else:
                texts[material_id] = text
            if i % 20 == 0 or i == len(jobs):
                print(f"  {i}/{len(jobs)} described, {len(failures)} failed, {time.perf_counter() - t0:.0f} s", flush=True)

    kept = [r for r in rows if r["material_id"] in texts]
    table = pd.DataFrame(
        {
            "material_id": [r["material_id"] for r in kept],
            "collection": [r["collection"] for r in kept],
            "structure": [r["structure"].to_json() for r in kept],
            "description": [texts[r["material_id"]] for r in kept],
            "formation_energy_per_atom": pd.array([r["formation_energy_per_atom"] for r in kept], dtype="Float64"),
            "formation_enthalpy_uncertainty": pd.array(
                [r["formation_enthalpy_uncertainty"] for r in kept], dtype="Float64"
            ),
            "exp_mp_id": [r["exp_mp_id"] for r in kept],
            "mp_id": [r["mp_id"] for r in kept],
            "aflow_label": [r["aflow_label"] for r in kept],
            "pearson_symbol": [r["pearson_symbol"] for r in kept],
            "strukturbericht": [r["strukturbericht"] for r in kept],
            "mineral": [r["mineral"] for r in kept],
            "reference": [r["reference"] for r in kept],
            "origin": [r["origin"] for r in kept],
        }
    )
    elapsed = time.perf_counter() - t0
    meta = {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "script": "scripts/make_sample.py",
        "versions": {p: version(p) for p in ("robocrys", "pymatgen", "pymatgen-core", "spglib")},
        "describer": "robocrys StructureCondenser() + StructureDescriber() defaults, PubChem off",
        "seconds": round(elapsed, 1),
        "robocrys_seconds_per_structure": round(sum(seconds) / max(len(seconds), 1), 2),
        "workers": args.workers,
        "attempted": len(rows),
        "described": len(kept),
        "failed": failures,
        "left_out": left_out,
        "formation_enthalpies": int(table["formation_energy_per_atom"].notna().sum()),
    }
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), b"cmma_sample": json.dumps(meta).encode()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    pq.write_table(arrow, tmp, compression="zstd", compression_level=19)
    tmp.replace(args.out)
    print(json.dumps({k: v for k, v in meta.items() if k not in ("failed", "left_out")}, indent=1))
    print(f"failed: {len(failures)}; left out: {len(left_out)}; wrote {args.out} "
          f"({args.out.stat().st_size / 1e6:.2f} MB) in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
