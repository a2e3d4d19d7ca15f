"""CHGNet (Deng et al. 2023) as a structure encoder: the ``chgnet`` package's pretrained model (``0.3.0``, or
``--structure-checkpoint`` a ``.pth.tar`` of its trainer) and its own crystal graphs.

Parts of the material vector (:mod:`~cmma_cli.modalities.structure.encoders.backbone`): ``layers`` the mean atom
features after each of its 4 atom-convolution layers (4 x 64), ``crystal`` the mean of the layer-normalised atom
features its energy readout reads (64), ``energy`` its predicted energy per atom. Forces are never computed.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from cmma_cli.modalities.structure.encoders.backbone import BackboneEncoder, BackboneOutput


class CHGNetBackbone(BackboneEncoder):
    package = "chgnet"
    label = "CHGNet"
    weights = "0.3.0"  # CHGNet.load(model_name=...)

    @classmethod
    def load_model(cls, checkpoint: str | None) -> nn.Module:
        from chgnet.model import CHGNet

        if checkpoint:
            return CHGNet.from_file(checkpoint).to("cpu")
        return CHGNet.load(model_name=cls.weights, use_device="cpu", verbose=False)

    @classmethod
    def graph(cls, model: nn.Module, structure) -> Any:
        return model.graph_converter(structure)

    @classmethod
    def run(cls, model: nn.Module, graphs: list[Any]) -> BackboneOutput:
        device = next(model.parameters()).device
        graphs = [g.to(device) for g in graphs]
        layers: list[torch.Tensor] = []
        seen: list[torch.Tensor] = []
        hooks = [layer.register_forward_hook(lambda _m, _i, out: layers.append(out))
                 for layer in model.atom_conv_layers]
        # the atom features the readout reads: after its normalisation when it has one
        readout = model.readout_norm if model.readout_norm is not None else model.atom_conv_layers[-1]
        hooks.append(readout.register_forward_hook(lambda _m, _i, out: seen.append(out)))
        try:
            with warnings.catch_warnings():  # chgnet copies the lattices' volumes with torch.tensor (a UserWarning)
                warnings.simplefilter("ignore", UserWarning)
                pred = model(graphs, task="e")
        finally:
            for hook in hooks:
                hook.remove()
        counts = pred["atoms_per_graph"]
        energy = pred["e"] if model.is_intensive else pred["e"] / counts
        owners = torch.repeat_interleave(torch.arange(len(graphs), device=counts.device), counts)
        return BackboneOutput(layers=layers[-len(model.atom_conv_layers):], crystal=seen[-1], energy=energy,
                              owners=owners)

    @classmethod
    def blocks(cls, model: nn.Module) -> list[list[nn.Module]]:
        """Block i: atom convolution i, then the bond and angle updates that run after it in CHGNet's loop."""
        out = []
        for i, atom in enumerate(model.atom_conv_layers):
            block = [atom]
            if i < len(model.atom_conv_layers) - 1:
                block += [m for m in (model.bond_conv_layers[i], model.angle_layers[i]) if isinstance(m, nn.Module)]
            out.append(block)
        return out
