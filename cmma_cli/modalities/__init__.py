"""The modalities a model can align, by name.

Each one lives in its own module (``structure.py``, ``text.py``, ...) as a
:class:`~cmma_cli.modalities.base.Modality`: the facts its encoder is built from, how it reads the
processed table, how it collates a batch and its encoder. Adding a modality is one new module plus one
line in :data:`REGISTRY`.
"""

from __future__ import annotations

from cmma_cli.errors import CMMAError
from cmma_cli.modalities.base import Modality
from cmma_cli.modalities.image import ImageModality
from cmma_cli.modalities.structure import StructureModality
from cmma_cli.modalities.text import TextModality
from cmma_cli.modalities.xrd import XRDModality

REGISTRY: dict[str, Modality] = {
    "structure": StructureModality(),
    "text": TextModality(),
    "xrd": XRDModality(),
    "image": ImageModality(),
}


def get_modality(name: str) -> Modality:
    """The registered modality ``name``, or one sentence listing the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise CMMAError(f"Unknown modality {name!r}: choose from {', '.join(REGISTRY)} (e.g. --modalities structure,text,xrd).") from None


def check_modalities(names: list[str]) -> list[str]:
    """``names`` without repeats, each known, at least two of them (a contrastive loss needs a pair)."""
    names = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    for name in names:
        get_modality(name)
    if len(names) < 2:
        raise CMMAError(f"Training aligns modalities in pairs, so it needs at least two, not {names}: "
                        "e.g. --modalities structure,text,xrd.")
    return names
