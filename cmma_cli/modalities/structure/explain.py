"""Per-atom attributions of a structure's cross-modal similarity (imported only by ``cmma evaluate``).

Each atom's features before pooling (:meth:`~cmma_cli.modalities.structure.encoders.base.GraphEncoder.atoms`)
pass through the structure projection head and are normalised, then dotted with the other modality's unit
embedding: positive atoms pull the pair together. Reported per atom and averaged per element.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cmma_cli.modalities.base import Attribution, ExplainContext


def atom_contributions(encoder, head, inputs: dict[str, torch.Tensor], other: torch.Tensor) -> np.ndarray:
    """(atoms,) each atom's projected node embedding (normalised) dotted with the unit vector ``other``."""
    with torch.no_grad():
        per_atom = F.normalize(head(encoder.atoms(inputs)).float(), dim=-1)
    return (per_atom @ other).cpu().numpy()


def attribute(encoder, head, inputs: dict[str, torch.Tensor], other: torch.Tensor, ctx: ExplainContext
              ) -> Attribution:
    """``atoms`` (index, element, score) and ``elements`` (mean score per element, in order of appearance)."""
    from pymatgen.core import Element

    symbols = [Element.from_Z(int(n)).symbol for n in inputs["z"].cpu().numpy()]
    scores = atom_contributions(encoder, head, inputs, other)
    fields: dict[str, Any] = {
        "atoms": [{"index": i, "element": s, "score": float(v)} for i, (s, v) in enumerate(zip(symbols, scores))],
        "elements": {s: float(np.mean([v for sym, v in zip(symbols, scores) if sym == s])) for s in dict.fromkeys(symbols)},
    }

    def plot(ax) -> None:
        els = list(fields["elements"])
        vals = [fields["elements"][e] for e in els]
        ax.bar(els, vals, color=["tab:green" if v >= 0 else "tab:red" for v in vals])
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(f"atoms vs {ctx.partner} (mean per element)", fontsize=9)

    return Attribution(fields, plot)
