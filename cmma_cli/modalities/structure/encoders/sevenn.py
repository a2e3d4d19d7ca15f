"""SevenNet (Park et al. 2024) as a structure encoder: the ``sevenn`` package's pretrained ``SevenNet-0``
(11 July 2024, shipped in the package; or ``--structure-checkpoint`` a SevenNet checkpoint), loaded and batched
with sevenn's own utilities (the checkpoint, ``unlabeled_atoms_to_graph``, ``AtomGraphData``).

Parts of the material vector (:mod:`~cmma_cli.modalities.structure.encoders.backbone`): ``layers`` the mean of
the rotation-invariant (``0e``) channels of the node features after each of its 5 interaction blocks
(5 x 128), ``crystal`` the mean of the hidden atom features of its energy readout (64), ``energy`` its
predicted energy per atom. The force and stress module is removed: forces are never computed.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from cmma_cli.errors import CMMAError
from cmma_cli.modalities.structure.encoders.backbone import BackboneEncoder, BackboneOutput

GATE = "_equivariant_gate"  # the last module of each interaction block
READOUT = "reduce_input_to_hidden"  # the first layer of the energy readout


def _scalars(irreps) -> list[slice]:
    """The slices of the even scalar (``0e``) channels of an e3nn ``Irreps``."""
    return [s for (_, ir), s in zip(irreps, irreps.slices()) if ir.l == 0 and ir.p == 1]


class SevenNetBackbone(BackboneEncoder):
    package = "sevenn"
    label = "SevenNet"
    weights = "7net-0_11July2024"  # sevenn.util.load_checkpoint(...): the packaged SevenNet_0__11Jul2024

    @classmethod
    def load_model(cls, checkpoint: str | None) -> nn.Module:
        import sevenn._keys as KEY
        from sevenn import util

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cp = util.load_checkpoint(checkpoint or cls.weights)
            model = cp.build_model()
        if model.modal_map:
            raise CMMAError(f"The SevenNet checkpoint {checkpoint or cls.weights} is multi-fidelity (modals "
                            f"{', '.join(model.modal_map)}), which the sevenn structure encoder does not support: pass "
                            "a single-fidelity checkpoint such as SevenNet-0.")
        if "force_output" in model._modules:
            model.delete_module_by_key("force_output")  # energies only: no autograd forces or stress
        model.key_grad = None
        model.set_is_batch_data(True)
        model.cmma_cutoff = float(cp.config[KEY.CUTOFF])
        return model.to("cpu")

    @classmethod
    def supports(cls, model: nn.Module | None, numbers: np.ndarray) -> bool:
        if model is None or not model.type_map:
            return super().supports(model, numbers)
        return bool(numbers.size) and all(int(z) in model.type_map for z in np.unique(numbers))

    @classmethod
    def graph(cls, model: nn.Module, structure) -> Any:
        from pymatgen.io.ase import AseAtomsAdaptor
        from sevenn.atom_graph_data import AtomGraphData
        from sevenn.train.dataload import unlabeled_atoms_to_graph

        if not cls.supports(model, np.array([s.specie.Z for s in structure])):
            raise ValueError("an element SevenNet was not trained on")
        atoms = AseAtomsAdaptor.get_atoms(structure)
        return AtomGraphData.from_numpy_dict(unlabeled_atoms_to_graph(atoms, model.cmma_cutoff, with_shift=False))

    @classmethod
    def run(cls, model: nn.Module, graphs: list[Any]) -> BackboneOutput:
        import sevenn._keys as KEY
        from torch_geometric.data import Batch

        device = next(model.parameters()).device
        batch = Batch.from_data_list(graphs).to(device)
        layers: list[torch.Tensor] = []
        seen: list[torch.Tensor] = []
        hooks = []
        for name, module in model._modules.items():
            if name.endswith(GATE):
                cut = _scalars(module.gate.irreps_out)

                def scalars(_m, _i, out, cut=cut):
                    layers.append(torch.cat([out[KEY.NODE_FEATURE][:, s] for s in cut], 1))

                hooks.append(module.register_forward_hook(scalars))
            elif name == READOUT:
                hooks.append(module.register_forward_hook(lambda _m, _i, out: seen.append(out[KEY.NODE_FEATURE])))
        try:
            out = model(batch)
        finally:
            for hook in hooks:
                hook.remove()
        owners = out[KEY.BATCH]
        counts = torch.bincount(owners, minlength=len(graphs)).clamp_min(1)
        energy = out[KEY.PRED_TOTAL_ENERGY].reshape(-1) / counts
        return BackboneOutput(layers=layers, crystal=seen[-1], energy=energy, owners=owners)

    @classmethod
    def blocks(cls, model: nn.Module) -> list[list[nn.Module]]:
        """Block i: the modules named ``i_...`` (self-connection, convolution, gate), in order."""
        blocks: dict[int, list[nn.Module]] = {}
        for name, module in model._modules.items():
            head = name.split("_", 1)[0]
            if head.isdigit():
                blocks.setdefault(int(head), []).append(module)
        return [blocks[i] for i in sorted(blocks)]
