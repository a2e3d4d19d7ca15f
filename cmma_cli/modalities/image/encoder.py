"""The image encoder: a timm backbone without its classifier (timm is imported only here)."""

from __future__ import annotations

import torch
from torch import nn

from cmma_cli.console import console
from cmma_cli.errors import CMMAError
from cmma_cli.modalities.image import _timm


class ImageEncoder(nn.Module):
    """A timm backbone without its classifier: (rows, 3, size, size) -> (rows, num_features)."""

    def __init__(self, model: str, pretrained: bool):
        super().__init__()
        timm = _timm()
        try:
            self.backbone = timm.create_model(model, pretrained=pretrained, num_classes=0)
        except Exception as exc:  # weights unreachable offline: the architecture still trains from scratch
            if not pretrained:
                raise CMMAError(f"timm could not build {model!r} ({exc}): choose another --image-model.") from None
            console.print(f"[yellow]Pretrained weights for {model} are not reachable ({type(exc).__name__}); "
                          "the image encoder starts from random weights.[/]")
            self.backbone = timm.create_model(model, pretrained=False, num_classes=0)
        self.out_dim = int(self.backbone.num_features)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.backbone(inputs["image"])
