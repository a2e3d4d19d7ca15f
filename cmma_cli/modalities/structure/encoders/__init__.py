"""Structure encoders by name: one class per architecture, one module each, one line here.

Every encoder takes the collated crystal graph of :class:`~cmma_cli.modalities.structure.StructureModality`
(``z``, ``edge_index``, ``dist``, ``vec``, ``batch``, ``num_nodes``) and returns one vector per material
(``out_dim`` wide). Adding one: a module with a :class:`~cmma_cli.modalities.structure.encoders.base.GraphEncoder`
subclass, and its line in :data:`ENCODERS`. Modules are imported only when an encoder is built, so the
command line starts without torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

#: ``name -> "module:Class"`` (``--structure-encoder NAME``).
ENCODERS: dict[str, str] = {
    "schnet": "cmma_cli.modalities.structure.encoders.schnet:SchNet",
    "cgcnn": "cmma_cli.modalities.structure.encoders.cgcnn:CGCNN",
    "painn": "cmma_cli.modalities.structure.encoders.painn:PaiNN",
}


def names() -> tuple[str, ...]:
    """The registered architectures, in registry order."""
    return tuple(ENCODERS)


def encoder_class(name: str) -> type:
    """The encoder class registered as ``name``."""
    module, _, cls = ENCODERS[name].partition(":")
    return getattr(import_module(module), cls)


def build(spec: dict[str, Any]):
    """A fresh encoder from a structure spec (its ``architecture`` picks the class)."""
    return encoder_class(spec["architecture"])(**{k: spec[k] for k in ("hidden", "layers", "num_rbf", "cutoff",
                                                                          "pooling", "avg_neighbors")})
