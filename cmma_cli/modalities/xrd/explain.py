"""Per-2θ-region attributions of a pattern's cross-modal similarity (imported only by ``cmma evaluate``).

Gradient x input on the pattern's intensities, of the cosine similarity between the pattern's projected
embedding and the other modality's unit embedding, summed over 2θ regions ``cfg.xrd.region`` degrees wide.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cmma_cli.modalities.base import Attribution, ExplainContext

#: Regions listed as the strongest.
TOP_REGIONS = 3


def region_attributions(encoder, head, pattern: torch.Tensor, other: torch.Tensor, grid: dict[str, Any],
                        width: float) -> list[dict[str, float]]:
    """Gradient x input of the pattern side summed over 2-theta regions of ``width`` degrees."""
    x = pattern.detach().float().clamp_min(1e-12).requires_grad_(True)
    with torch.enable_grad():
        z = F.normalize(head(encoder({"pattern": x[None]})).float(), dim=-1)[0]
        (z @ other).backward()
    per_point = (x.grad * x).detach().cpu().numpy()
    start, step = float(grid["two_theta_min"]), float(grid["step"])
    two_theta = start + step * np.arange(len(per_point))
    edges = np.arange(start, float(grid["two_theta_max"]) + width, width)
    regions = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (two_theta >= lo) & (two_theta < hi)
        regions.append({"start": float(lo), "end": float(hi), "score": float(per_point[sel].sum())})
    return regions


def attribute(encoder, head, inputs: dict[str, torch.Tensor], other: torch.Tensor, ctx: ExplainContext) -> Attribution:
    """``regions`` (start, end, score for every region of the grid) and ``top_regions`` (the strongest)."""
    grid = ctx.processed_manifest["xrd_grid"]
    pattern = inputs["pattern"][0]
    regions = region_attributions(encoder, head, pattern, other, grid, ctx.settings.region)
    fields = {"regions": regions, "top_regions": sorted(regions, key=lambda r: -abs(r["score"]))[:TOP_REGIONS]}
    values = pattern.detach().cpu().numpy()

    def plot(ax) -> None:
        two_theta = grid["two_theta_min"] + grid["step"] * np.arange(len(values))
        ax.plot(two_theta, values, color="black", linewidth=0.7)
        twin = ax.twinx()
        mids = [(r["start"] + r["end"]) / 2 for r in regions]
        scores = [r["score"] for r in regions]
        twin.bar(mids, scores, width=(regions[0]["end"] - regions[0]["start"]) * 0.9, alpha=0.35,
                 color=["tab:green" if s >= 0 else "tab:red" for s in scores])
        ax.set_xlabel("2θ (degrees)")
        ax.set_title("XRD pattern and per-region attribution", fontsize=9)

    return Attribution(fields, plot)
