"""One dataclass per stage: every option a stage takes, with its default.

A stage's config is recorded in its manifest; an unchanged config over unchanged inputs means the
stage is up to date. ``--config file.toml`` files hold the same fields (a ``[train]`` table, ...).
Secrets (API keys) are never part of a config.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cmma_cli.errors import CMMAError


def as_dict(config: Any) -> dict[str, Any]:
    """A config as a plain dict (what manifests record)."""
    return asdict(config)


def load_toml_section(path: Path, section: str, cls: type) -> dict[str, Any]:
    """The ``[section]`` table of a TOML config file, checked against the fields of ``cls``."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CMMAError(f"Config file {path} does not exist: check the path given to --config.") from None
    except tomllib.TOMLDecodeError as exc:
        raise CMMAError(f"Config file {path} is not valid TOML ({exc}): fix it or leave out --config.") from None
    table = data.get(section, {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise CMMAError(
            f"Config file {path} has unknown [{section}] keys {unknown}: the known keys are {sorted(known)}."
        )
    return table


@dataclass
class FetchConfig:
    """``cmma fetch``: where raw data comes from and which materials to take."""

    source: str = "sample"  # sample | mp | local
    paths: list[str] = field(default_factory=list)  # local files / folders (source=local)
    elements: list[str] = field(default_factory=list)  # materials containing all of these elements (mp)
    chemsys: str | None = None  # e.g. "Li-Fe-O": exactly this chemical system (mp)
    max_sites: int | None = None  # at most this many sites per structure
    stable_only: bool = False  # only materials on the convex hull (mp)
    limit: int | None = None  # at most this many materials
    synthesis: bool = True  # also fetch / link synthesis recipes
    descriptions: bool = True  # also fetch robocrys descriptions (mp)
    endpoint: str | None = None  # Materials Project API endpoint (default: the public one)
    chunk_size: int = 500  # materials per request (mp); the unit of resumption


@dataclass
class PreprocessConfig:
    """``cmma preprocess``: how raw data becomes graphs, clean text, XRD patterns and splits."""

    cutoff: float = 5.0  # radius (Angstrom) of the periodic neighbour graph
    max_neighbors: int | None = None  # keep at most this many nearest neighbours per atom (ties kept)
    min_distance: float = 0.5  # atoms closer than this (Angstrom) overlap: the structure is rejected
    max_sites: int | None = None  # structures with more sites are rejected (None: no cap)
    xrd: bool = True  # compute a powder XRD pattern for every structure
    two_theta_min: float = 10.0  # start of the XRD 2-theta grid (degrees)
    two_theta_max: float = 90.0  # end of the XRD 2-theta grid (degrees)
    two_theta_step: float = 0.05  # XRD grid resolution (degrees); 10-90 at 0.05 gives 1601 points
    xrd_fwhm: float = 0.2  # Gaussian peak width (FWHM, degrees) used to broaden computed patterns
    wavelength: str = "CuKa"  # X-ray source for computed patterns (a pymatgen name, e.g. CuKa, MoKa)
    xrd_dir: str | None = None  # folder of measured patterns <material_id>.xy/.txt/.csv (2-theta, intensity)
    image_dir: str | None = None  # folder of images <material_id>.png/.jpg/.tif
    split_by: str = "composition"  # group splits by reduced composition, or by chemical system: chemsys
    val_fraction: float = 0.1  # share of materials in the validation split
    test_fraction: float = 0.1  # share of materials in the test split
    seed: int = 0  # seed of the split assignment
    workers: int | None = None  # worker processes (None: all cores); does not change the output
    chunk_size: int = 1024  # materials read, featurized and written per step; does not change the output
