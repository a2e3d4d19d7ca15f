"""A toy modality in ONE module, for the test that a modality plugs in without touching any other file.

``rdf``: a 1-D spectrum per material, read from a folder of ``<material_id>.rdf`` files (two columns:
r in Angstrom, g(r)) given with ``--rdf-dir``, put on a fixed r grid, and encoded by a small MLP. Its
only registration is one line: ``cmma_cli.modalities.register(RDFModality())``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from cmma_cli.errors import CMMAError
from cmma_cli.modalities.base import Context, Item, Modality, Prepared, UserInputs
from cmma_cli.modalities.columns import csr

SUFFIXES = (".rdf",)


@dataclass
class RDFPreprocess:
    dir: str | None = None  # folder of <material_id>.rdf files (r, g(r))
    points: int = 64  # points of the r grid the spectra are put on
    r_max: float = 8.0  # end of the r grid (Angstrom)


@dataclass
class RDFSettings:
    hidden: int = 64  # width of the RDF encoder
    scale: str = field(default="sqrt", metadata={"choices": ("sqrt", "linear")})  # intensity scaling: sqrt | linear


@dataclass
class RDFData(Prepared):
    present: np.ndarray
    values: np.ndarray  # (rows with a spectrum, points)
    position: np.ndarray  # (rows,) row of ``values``, -1 when absent


def read_spectrum(path: Path, points: int, r_max: float) -> np.ndarray:
    """A two-column file on the r grid, scaled to max 1; ValueError when it holds no signal."""
    data = np.loadtxt(path, ndmin=2)
    if data.shape[1] < 2 or len(data) < 2:
        raise ValueError("fewer than two (r, g(r)) rows")
    grid = np.linspace(0.0, r_max, points)
    values = np.interp(grid, data[:, 0], data[:, 1], left=0.0, right=0.0)
    top = values.max()
    if not top > 0:
        raise ValueError("a flat spectrum")
    return (values / top).astype(np.float32)


class RDFModality(Modality):
    name = "rdf"
    columns = ("rdf",)
    fields = (pa.field("rdf", pa.list_(pa.float32())),)
    train_config = RDFSettings
    preprocess_config = RDFPreprocess
    folder_setting, folder_suffixes = "dir", SUFFIXES  # --rdf-dir: gather() gives featurize() each material's file
    query_option = "rdf"
    query_help = "Query with a radial distribution function file (r, g(r))."
    query_example = "--rdf FILE.rdf"
    input_help = "radial distribution functions (.rdf)"

    def featurize(self, item: Item, cfg: RDFPreprocess) -> dict[str, Any]:
        path = item.linked.get(self.name)
        if path is None:
            return {}
        try:
            return {"rdf": read_spectrum(Path(path), cfg.points, cfg.r_max)}
        except (OSError, ValueError) as exc:
            item.reject(self.name, path, str(exc))
            return {}

    def claim_input(self, path: Path) -> int:
        return 2 if Path(path).suffix in SUFFIXES else 0

    def read_inputs(self, paths: list[Path], cfg: RDFPreprocess) -> UserInputs:
        out = UserInputs()
        spectra = []
        for path in paths:
            try:
                spectra.append(read_spectrum(Path(path), cfg.points, cfg.r_max))
            except (OSError, ValueError) as exc:
                out.rejects.append({"source": self.name, "item": str(path), "reason": str(exc)})
                continue
            out.ids.append(Path(path).stem)
            out.materials.append({"material_id": Path(path).stem, "kind": self.name, "file": str(path)})
        out.values = {"rdf": spectra}
        return out

    def read_query(self, value: Any, cfg: RDFPreprocess) -> UserInputs:
        got = self.read_inputs([Path(value)], cfg)
        if not got.ids:
            raise CMMAError(f"Could not read the RDF file {value}: give two numeric columns, r and g(r).")
        return got

    def spec(self, cfg: RDFSettings, table: pa.Table | None, ctx: Context) -> dict[str, Any]:
        points = ctx.processed_manifest.get("config", {}).get(self.name, {}).get("points", 64)
        return {"points": int(points), "hidden": cfg.hidden, "scale": cfg.scale}

    def prepare(self, table: pa.Table, spec: dict[str, Any], ctx: Context) -> RDFData:
        values, offsets, valid = csr(table.column("rdf"), np.float32)
        position = np.full(len(valid), -1, dtype=np.int64)
        position[valid] = np.arange(int(valid.sum()))
        return RDFData(valid, values.reshape(-1, spec["points"]), position)

    def collate(self, data: RDFData, rows: np.ndarray, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        return {"rdf": torch.from_numpy(data.values[data.position[rows]])}

    def encoder(self, spec: dict[str, Any]) -> nn.Module:
        return RDFEncoder(spec["points"], spec["hidden"], spec["scale"])


class RDFEncoder(nn.Module):
    def __init__(self, points: int, hidden: int, scale: str):
        super().__init__()
        self.scale, self.out_dim = scale, hidden
        self.net = nn.Sequential(nn.Linear(points, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs["rdf"]
        return self.net(torch.sqrt(x.clamp_min(0)) if self.scale == "sqrt" else x)
