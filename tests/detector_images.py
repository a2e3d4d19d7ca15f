"""Real images for the image modality's tests: each material's powder XRD as a 2-D detector image.

A flat area detector perpendicular to the beam, the beam centre on its lower-left corner, records the
Debye-Scherrer rings of a powder: the pixel at distance ``r`` (in units of the sample-detector distance)
from the beam centre sees 2-theta = arctan(r). Each pixel's brightness is the material's computed pattern
(:func:`cmma_cli.modalities.xrd.patterns.computed_pattern`, Cu K-alpha) at that angle, averaged over the
pixel (``oversample`` squared points) so rings narrower than a pixel are not lost, on a square-root scale
so weak rings show. The image is written by matplotlib as a grey PNG, ``<material_id>.png``.

Run by hand: ``python tests/detector_images.py WORKSPACE FOLDER [COUNT]`` writes the images of the first
COUNT materials of a fetched workspace (``cmma fetch`` first), for ``cmma preprocess --image-dir FOLDER``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

#: 2-theta (degrees) at the corner opposite the beam centre.
CORNER_TWO_THETA = 75.0


def detector_image(structure, size: int = 64, oversample: int = 4, counts: float | None = None,
                   seed: int = 0) -> np.ndarray:
    """The (size, size) detector image of ``structure``'s powder rings, values in [0, 1].

    ``counts``: a measurement instead, with Poisson counting noise, the brightest pixel expecting that many photons.
    """
    from cmma_cli.modalities.xrd.patterns import XRDGrid, computed_pattern

    grid = XRDGrid(two_theta_min=5.0, two_theta_max=CORNER_TWO_THETA + 1.0, step=0.02, fwhm=0.15)
    pattern = computed_pattern(structure, grid)
    n = size * oversample
    side = np.tan(np.radians(CORNER_TWO_THETA)) / np.sqrt(2.0)  # detector side, in sample-detector distances
    coords = (np.arange(n) + 0.5) / n * side
    x, y = np.meshgrid(coords, coords[::-1])  # the beam centre at the lower-left corner
    two_theta = np.degrees(np.arctan(np.hypot(x, y)))
    fine = np.interp(two_theta, grid.points, pattern, left=0.0, right=0.0)
    image = fine.reshape(size, oversample, size, oversample).mean(axis=(1, 3))
    image = image / max(float(image.max()), 1e-12)
    if counts is not None:
        image = np.random.default_rng(seed).poisson(image * counts) / counts
        image = image / max(float(image.max()), 1e-12)
    image = np.sqrt(image)
    return image.astype(np.float32)


def write_detector_images(materials, folder: Path, size: int = 64, counts: float | None = None) -> list[Path]:
    """``<material_id>.png`` in ``folder`` for each row of ``materials`` (``material_id``, ``structure`` as JSON);
    ``counts``: noisy measurements (see :func:`detector_image`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pymatgen.core import Structure

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for mid, blob in zip(materials["material_id"], materials["structure"]):
        path = folder / f"{mid}.png"
        plt.imsave(path, detector_image(Structure.from_str(blob, fmt="json"), size, counts=counts), cmap="gray", vmin=0.0, vmax=1.0)
        written.append(path)
    return written


if __name__ == "__main__":
    import pandas as pd

    workspace, out = Path(sys.argv[1]), Path(sys.argv[2])
    count = int(sys.argv[3]) if len(sys.argv) > 3 else None
    table = pd.read_parquet(workspace / "raw" / "materials.parquet", columns=["material_id", "structure"])
    paths = write_detector_images(table.head(count) if count else table, out)
    print(f"wrote {len(paths)} detector images to {out}")
