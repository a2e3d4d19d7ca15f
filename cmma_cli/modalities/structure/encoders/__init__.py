"""Structure encoders by name: one class per architecture, one module each, one line here.

Two kinds, chosen with ``--structure-encoder``:

- graph networks trained from scratch (``schnet``, ``cgcnn``, ``painn``): a
  :class:`~cmma_cli.modalities.structure.encoders.base.GraphEncoder` subclass that takes the collated crystal
  graph of :class:`~cmma_cli.modalities.structure.StructureModality` (``z``, ``edge_index``, ``dist``, ``vec``,
  ``batch``, ``num_nodes``) and returns one vector per material (``out_dim`` wide);
- pretrained universal potentials (``chgnet``, ``sevenn``): a
  :class:`~cmma_cli.modalities.structure.encoders.backbone.BackboneEncoder` adapter around the package's own
  model and graph construction, frozen (material vectors cached in the workspace) or fine-tuned.

An encoder class may define its own ``make_spec(architecture, cfg, ctx)``, ``prepare(table, spec, ctx)`` and
``collate(data, rows, rng)`` (static or class methods); the structure modality then uses them instead of its
graph path, and builds the encoder from its whole spec.
Adding one: a module with the class, and its line in :data:`ENCODERS`; or, without touching cmma, pass
``--structure-encoder package.module:Class``. Modules are imported only when an encoder is built, so the
command line starts without torch.
"""

from __future__ import annotations

import re
from importlib import import_module
from typing import Any

from cmma_cli.errors import CMMAError

#: ``name -> "module:Class"`` (``--structure-encoder NAME``).
ENCODERS: dict[str, str] = {
    "schnet": "cmma_cli.modalities.structure.encoders.schnet:SchNet",
    "cgcnn": "cmma_cli.modalities.structure.encoders.cgcnn:CGCNN",
    "painn": "cmma_cli.modalities.structure.encoders.painn:PaiNN",
    "chgnet": "cmma_cli.modalities.structure.encoders.chgnet:CHGNetBackbone",
    "sevenn": "cmma_cli.modalities.structure.encoders.sevenn:SevenNetBackbone",
}

#: ``package.module:Class``: a user's own encoder class, named by where it lives.
_CLASS_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


#: Pretrained backbones by preference for the default ``--structure-encoder``: the first whose package is
#: installed (and ``schnet``, trained from scratch, without any): ``{name: package}``.
PREFERRED = {"chgnet": "chgnet"}


def default() -> str:
    """The default ``--structure-encoder``: CHGNet where its package is installed, else SchNet."""
    from importlib.util import find_spec

    return next((name for name, package in PREFERRED.items() if find_spec(package) is not None), "schnet")


def names() -> tuple[str, ...]:
    """The registered architectures, in registry order."""
    return tuple(ENCODERS)


def check_name(name: str) -> None:
    """Refuse (one sentence) a ``--structure-encoder`` that is neither registered nor ``module:Class``."""
    if name not in ENCODERS and not _CLASS_PATH.match(str(name)):
        raise CMMAError(f"--structure-encoder must be one of {', '.join(names())} or a class given as "
                        f"package.module:Class, not {name!r}.")


def encoder_class(name: str) -> type:
    """The encoder class registered as ``name``, or the class ``name`` points at (``package.module:Class``)."""
    check_name(name)
    module, _, cls = ENCODERS.get(name, name).partition(":")
    try:
        found = getattr(import_module(module), cls)
    except ImportError as exc:
        if name in ENCODERS:
            raise
        raise CMMAError(f"--structure-encoder {name}: the module {module} cannot be imported ({exc}).") from None
    except AttributeError:
        raise CMMAError(f"--structure-encoder {name}: the module {module} has no class {cls}.") from None
    if not isinstance(found, type):
        raise CMMAError(f"--structure-encoder {name}: {cls} in {module} is not a class.")
    return found


def is_backbone(name: str) -> bool:
    """Whether ``name`` is a pretrained backbone adapter (it prepares its own inputs), not a graph network."""
    return hasattr(encoder_class(name), "prepare")


def build(spec: dict[str, Any]):
    """A fresh encoder from a structure spec (its ``architecture`` picks the class)."""
    cls = encoder_class(spec["architecture"])
    if hasattr(cls, "prepare"):  # an encoder that prepares its own inputs is built from its whole spec
        return cls(spec)
    return cls(**{k: spec[k] for k in ("hidden", "layers", "num_rbf", "cutoff", "pooling", "avg_neighbors")})
