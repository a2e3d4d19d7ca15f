"""The modalities a model can align, by name.

Each one lives in its own module or package (``structure/``, ``text/``, ``xrd/``, ``composition/``, ``image/``) as a
:class:`~cmma_cli.modalities.base.Modality`: its processed columns and how preprocess computes them, its
settings, its encoder, how a user's file becomes a query, and its attributions. Every other module asks
this registry; adding a modality is one new module plus one line in :data:`REGISTRY`.

A modality can also live in another package: it is registered by one entry point in that package's
``pyproject.toml`` (``[project.entry-points."cmma.modalities"]``, ``rdf = "mypackage.rdf:RDFModality"``),
or by one :func:`register` call before the command line is built.
"""

from __future__ import annotations

import warnings

from cmma_cli.errors import CMMAError
from cmma_cli.modalities.base import Modality
from cmma_cli.modalities.composition import CompositionModality
from cmma_cli.modalities.image import ImageModality
from cmma_cli.modalities.structure import StructureModality
from cmma_cli.modalities.text import TextModality
from cmma_cli.modalities.xrd import XRDModality

#: Registration order is the order of the processed columns, the reports and the preprocess workers
#: (structure first: a structure it rejects is rejected for every view derived from it).
REGISTRY: dict[str, Modality] = {m.name: m for m in (
    StructureModality(),
    TextModality(),
    XRDModality(),
    CompositionModality(),
    ImageModality(),
)}


#: The entry-point group other packages publish modalities under.
ENTRY_POINTS = "cmma.modalities"


def register(modality: Modality) -> Modality:
    """Add ``modality`` to the registry (a plug-in's one line); returns it."""
    if not modality.name or not modality.name.isidentifier():
        raise ValueError(f"a modality needs an identifier as its name, not {modality.name!r}")
    REGISTRY[modality.name] = modality
    return modality


def names() -> list[str]:
    """The registered modality names, in registry order."""
    return list(REGISTRY)


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


def load_plugins(group: str = ENTRY_POINTS) -> list[str]:
    """Register every modality published under the entry-point ``group``; returns their names.

    A plug-in that fails to load is skipped with a warning, so one broken package never stops cmma.
    """
    from importlib.metadata import entry_points

    loaded = []
    for entry in entry_points(group=group):
        try:
            modality = register(entry.load()())
        except Exception as exc:  # a third-party package: any failure is its own
            warnings.warn(f"cmma: the modality plug-in {entry.name!r} ({entry.value}) could not be loaded "
                          f"({type(exc).__name__}: {exc}); it is skipped.", stacklevel=2)
            continue
        loaded.append(modality.name)
    return loaded


load_plugins()
