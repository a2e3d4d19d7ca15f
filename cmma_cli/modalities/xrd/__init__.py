"""Powder XRD patterns (and other 1-D spectra on a fixed grid): a small 1-D CNN in plain torch.

``cmma preprocess`` puts every pattern on one 2-theta grid (:mod:`~cmma_cli.modalities.xrd.patterns`),
computed from the structure (:mod:`~cmma_cli.modalities.xrd.simulate`, pymatgen's XRDCalculator physics,
vectorised), or measured: a folder of ``<material_id>.xy`` files given
with ``--xrd-dir`` replaces the computed pattern. The encoder is :mod:`~cmma_cli.modalities.xrd.encoder`.

Training batches are augmented (``xrd_augment``) the way real measurements differ from computed
patterns (:mod:`~cmma_cli.modalities.xrd.augment`: strain, zero shift, broadening, texture, impurity peaks,
mixtures, background, noise). Evaluation never augments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cmma_cli.errors import CMMAError
from cmma_cli.modalities.base import Context, Item, Modality, Prepared, UserInputs
from cmma_cli.modalities.columns import csr

#: Training augmentation (:mod:`~cmma_cli.modalities.xrd.augment`): a zero-point shift of up to this many degrees.
AUGMENT_SHIFT_DEG = 0.3
#: Measured pattern files: two-column text (2-theta, intensity), PANalytical XML, powder CIF (pdCIF).
PATTERN_SUFFIXES = (".xy", ".xye", ".txt", ".csv", ".dat", ".xrdml", ".cif")
#: User files (``cmma embed --input``) that are patterns by their suffix, and those that are when they hold
#: two numeric columns (else a text or a table); a ``.cif`` is one when it holds a powder loop.
PATTERN_ONLY = (".xy", ".xye", ".dat", ".xrdml")
MAYBE_PATTERN = (".txt", ".md", ".csv", ".tsv")


@dataclass
class XRDPreprocess:
    """The 2-theta grid every pattern is put on, and where measured patterns come from (``cmma preprocess``)."""

    enabled: bool = field(default=True, metadata={"flag": "xrd"})  # compute a powder XRD pattern for every structure
    two_theta_min: float = field(default=10.0, metadata={"flag": "two_theta_min"})  # start of the XRD 2-theta grid (degrees)
    two_theta_max: float = field(default=90.0, metadata={"flag": "two_theta_max"})  # end of the XRD 2-theta grid (degrees)
    two_theta_step: float = field(default=0.05, metadata={"flag": "two_theta_step"})  # XRD grid resolution (degrees); 10-90 at 0.05 gives 1601 points
    fwhm: float = 0.2  # Gaussian peak width (FWHM, degrees) used to broaden computed patterns
    wavelength: str = field(default="CuKa", metadata={"flag": "wavelength"})  # X-ray source for computed patterns (a pymatgen name, e.g. CuKa, MoKa)
    dir: str | None = None  # folder of measured patterns <material_id>.xy/.txt/.csv (2-theta, intensity)


@dataclass
class XRDSettings:
    """The XRD encoder (``cmma train``)."""

    channels: int = 32  # width of the first XRD convolution (doubles twice)
    out_dim: int = 256  # width of the XRD encoder's output
    augment: bool = True  # make training patterns look measured: strain, shift, broadening, texture, impurities, mixtures, background, noise


def _positive_region(width: float) -> None:
    if not width > 0:
        raise CMMAError(f"--xrd-region must be a positive width in degrees 2-theta, not {width}.")


@dataclass
class XRDEvaluate:
    """XRD attributions (``cmma evaluate``)."""

    region: float = field(default=5.0, metadata={"check": _positive_region})  # width (degrees 2-theta) of the XRD attribution regions


@dataclass
class PatternData(Prepared):
    present: np.ndarray
    patterns: np.ndarray  # (rows with a pattern, length) float32
    position: np.ndarray  # (rows,) int64: the row of ``patterns`` of each table row, -1 when absent
    augment: bool = False
    max_shift: int = 0  # grid points
    grid: tuple[float, float, float] = (0.05, 10.0, 1.54184)  # step, first 2-theta (degrees), wavelength (angstrom)


def grid_of(cfg: XRDPreprocess):
    """The :class:`~cmma_cli.modalities.xrd.patterns.XRDGrid` the preprocess settings describe."""
    from cmma_cli.modalities.xrd.patterns import XRDGrid

    return XRDGrid(cfg.two_theta_min, cfg.two_theta_max, cfg.two_theta_step, cfg.fwhm, cfg.wavelength)


class XRDModality(Modality):
    name = "xrd"
    columns = ("xrd",)
    fields = (pa.field("xrd", pa.list_(pa.float32())), pa.field("xrd_source", pa.string()))
    default = True
    train_config = XRDSettings
    preprocess_config = XRDPreprocess
    evaluate_config = XRDEvaluate
    folder_setting, folder_suffixes, folder_source = "dir", PATTERN_SUFFIXES, "measured_xrd"  # --xrd-dir
    derived_keys = frozenset({"augment", "max_shift", "grid"})

    # ------------------------------------------------------------------------------------ preprocess

    def check(self, cfg: XRDPreprocess) -> None:
        from cmma_cli.modalities.xrd.simulate import WAVELENGTHS, wavelength_angstrom

        try:
            wavelength_angstrom(cfg.wavelength)
        except ValueError:
            raise CMMAError(f"--wavelength {cfg.wavelength!r} is not known: use one of "
                            f"{', '.join(sorted(WAVELENGTHS))} or a wavelength in angstrom (e.g. 1.5406).") from None
        super().check(cfg)
        try:
            grid_of(cfg)
        except ValueError as exc:
            raise CMMAError(f"The XRD grid options are inconsistent: {exc}.") from None

    def facts(self, cfg: XRDPreprocess) -> dict[str, Any]:
        return {"xrd_grid": grid_of(cfg).describe()}

    def featurize(self, item: Item, cfg: XRDPreprocess) -> dict[str, Any]:
        """The measured pattern where one was given and reads, else the one computed from the structure."""
        from cmma_cli.modalities.xrd.patterns import PatternRejected, computed_pattern, measured_pattern

        grid = grid_of(cfg)
        measured = item.linked.get(self.name)
        if measured is not None:
            try:
                return {"xrd": measured_pattern(Path(measured), grid), "xrd_source": "measured"}
            except (PatternRejected, OSError, UnicodeError) as exc:
                item.reject("measured_xrd", measured, str(exc))
        if cfg.enabled and item.structure is not None:
            try:
                return {"xrd": computed_pattern(item.structure, grid),
                        "xrd_source": "computed"}
            except PatternRejected as exc:
                item.reject("xrd", item.material_id, str(exc))
        return {}

    def tally(self, table: pa.Table) -> dict[str, dict[str, int]]:
        measured = pc.sum(pc.equal(table.column("xrd_source"), "measured")).as_py() or 0
        return {"modalities": {"xrd_measured": int(measured)}}

    def notes(self, counts: dict[str, dict[str, int]]) -> list[str]:
        measured = counts.get("modalities", {}).get("xrd_measured", 0)
        return [f"{measured} XRD patterns are measured (the rest computed)."] if measured else []

    # ----------------------------------------------------------------------------------------- train

    def spec(self, cfg: XRDSettings, table: pa.Table | None, ctx: Context) -> dict[str, Any]:
        length = ctx.processed_manifest.get("xrd_grid", {}).get("size")
        if length is None and table is not None and "xrd" in table.column_names:
            values, offsets, valid = csr(table.column("xrd"), np.float32)
            lengths = np.diff(offsets)[valid]
            length = int(lengths[0]) if lengths.size else None
        if not length:
            raise CMMAError("The processed data has no XRD grid: rerun `cmma preprocess` with --xrd, "
                            "or train without the xrd modality (--modalities structure,text).")
        from cmma_cli.modalities.xrd.simulate import wavelength_angstrom

        facts = ctx.processed_manifest.get("xrd_grid", {})
        step = facts.get("step", 0.05)
        grid = [step, facts.get("two_theta_min", 10.0), wavelength_angstrom(facts.get("wavelength", "CuKa"))]
        return {"length": int(length), "channels": cfg.channels, "out_dim": cfg.out_dim,
                "augment": cfg.augment, "max_shift": int(round(AUGMENT_SHIFT_DEG / step)), "grid": grid}

    def prepare(self, table: pa.Table, spec: dict[str, Any], ctx: Context) -> PatternData:
        values, offsets, valid = csr(table.column("xrd"), np.float32)
        lengths = np.diff(offsets)[valid]
        if lengths.size and (lengths != spec["length"]).any():
            bad = int(lengths[lengths != spec["length"]][0])
            raise CMMAError(f"An XRD pattern has {bad} points where the model expects {spec['length']}: "
                            "rerun `cmma preprocess --force` so every pattern is on one grid.")
        position = np.full(len(valid), -1, dtype=np.int64)
        position[valid] = np.arange(int(valid.sum()))
        return PatternData(valid, values.reshape(-1, spec["length"]), position, spec.get("augment", False),
                           spec.get("max_shift", 0), tuple(spec.get("grid", (0.05, 10.0, 1.54184))))

    def collate(self, data: PatternData, rows: np.ndarray, rng: np.random.Generator | None) -> dict:
        import torch

        patterns = data.patterns[data.position[rows]]
        if rng is not None and data.augment:
            from cmma_cli.modalities.xrd.augment import augment

            patterns = augment(patterns, rng, data.max_shift, *data.grid)
        return {"pattern": torch.from_numpy(patterns)}

    def encoder(self, spec: dict[str, Any]):
        from cmma_cli.modalities.xrd.encoder import PatternEncoder

        return PatternEncoder(spec["length"], spec["channels"], spec["out_dim"])

    # ---- embed and retrieve

    query_option = "pattern"
    query_help = "Query with a measured XRD pattern (.xy/.xye/.csv/.dat two-column text, .xrdml, powder CIF)."
    query_example = "--pattern FILE.xy"
    input_help = f"pattern files ({', '.join(PATTERN_ONLY)})"
    from_structure = True  # a CIF's computed pattern goes through the XRD encoder

    def claim_input(self, path) -> int:
        """``.xy`` / ``.xye`` / ``.dat`` / ``.xrdml`` files, ``.txt`` / ``.csv`` files holding two numeric columns,
        and CIFs holding measured powder data (3: above the structure modality's 2 for every ``.cif``)."""
        from cmma_cli.modalities.user_files import suffix
        from cmma_cli.modalities.xrd.patterns import PatternRejected, read_two_columns
        from cmma_cli.modalities.xrd.readers import is_pattern_cif

        kind = suffix(path)
        if kind in PATTERN_ONLY:
            return 2
        if kind == ".cif":
            return 3 if is_pattern_cif(path) else 0
        if kind in MAYBE_PATTERN:
            try:
                read_two_columns(path)
                return 2
            except (PatternRejected, OSError, UnicodeError):
                return 0
        return 0

    def read_inputs(self, paths, cfg: XRDPreprocess) -> UserInputs:
        """Measured patterns (id = the file stem) on the processed 2-theta grid, as ``--xrd-dir`` files are."""
        from cmma_cli.modalities.xrd.patterns import PatternRejected, measured_pattern

        grid = grid_of(cfg)
        out = UserInputs()
        patterns = []
        for path in paths:
            try:
                patterns.append(measured_pattern(Path(path), grid))
            except (PatternRejected, OSError, UnicodeError) as exc:
                out.rejects.append({"source": "measured_xrd", "item": str(path), "reason": str(exc)})
                continue
            out.ids.append(Path(path).stem)
            out.materials.append({"material_id": Path(path).stem, "kind": "pattern", "file": str(path)})
        out.values = {"xrd": patterns, "xrd_source": ["measured"] * len(patterns)}
        return out

    def link_inputs(self, paths, material_ids: set[str]) -> dict[str, tuple[Path, Any]]:
        """A pattern named like a structure file (``a.cif`` + ``a.xy``) is that structure's measured pattern,
        replacing the computed one, as with ``--xrd-dir``."""
        return {Path(p).stem: (Path(p), str(p)) for p in paths if Path(p).stem in material_ids}

    def read_query(self, value, cfg: XRDPreprocess) -> UserInputs:
        path = Path(value)
        if not path.is_file():
            raise CMMAError(f"The pattern file {path} does not exist: check the path given to --{self.query_option}.")
        got = self.read_inputs([path], cfg)
        if not got.ids:
            raise CMMAError(f"Could not read the XRD pattern {path}: {got.rejects[0]['reason']}.")
        return got

    # ---- evaluate

    attribution = "2θ regions"

    def attribute(self, encoder, head, inputs, other, ctx):
        """Gradient x input of the intensities, summed over 2θ regions ``cfg.xrd.region`` degrees wide."""
        from cmma_cli.modalities.xrd.explain import attribute

        return attribute(encoder, head, inputs, other, ctx)

    def attribution_text(self, pair: dict[str, Any], markdown: bool = True) -> list[str]:
        if "top_regions" not in pair:
            return []
        regions = [(r["start"], r["end"], r["score"]) for r in pair["top_regions"]]
        if not markdown:
            return ["  2θ regions: " + ", ".join(f"{a:.0f}-{b:.0f}° {v:+.3f}" for a, b, v in regions)]
        return ["2θ regions with the largest gradient x input attribution: "
                + ", ".join(f"{a:.0f}-{b:.0f}° {v:+.3f}" for a, b, v in regions) + ".", ""]
