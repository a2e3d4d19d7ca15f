"""Images (micrographs, 2-D detector images): any timm backbone, imported only when this modality is used.

``cmma preprocess --image-dir`` records one image path per material. Each batch loads its images
(in the loader workers), converts them to RGB, resizes them to ``image_size`` squared and normalises
them with the backbone's mean and standard deviation. ``image_pretrained`` asks timm for pretrained
weights; where they cannot be downloaded, training starts from random weights with a warning.
Checkpoints hold the trained weights, so rebuilding the model never downloads anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from cmma_cli.console import console
from cmma_cli.errors import CMMAError
from cmma_cli.modalities.base import Context, Modality, Prepared

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _timm():
    try:
        import timm
    except ImportError:
        raise CMMAError(
            "The image modality needs timm, which is not installed: `pip install 'cmma[images]'` "
            "(or train without images, e.g. --modalities structure,text,xrd)."
        ) from None
    return timm


@dataclass
class ImageData(Prepared):
    present: np.ndarray
    paths: list[str | None]
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class ImageModality(Modality):
    name = "image"
    columns = ("image_path",)

    def spec(self, cfg: Any, table: pa.Table | None, ctx: Context) -> dict[str, Any]:
        timm = _timm()
        if not timm.list_models(cfg.image_model) and not timm.list_models(cfg.image_model.split(".")[0]):
            raise CMMAError(f"--image-model {cfg.image_model!r} is not a timm model name (see timm.list_models()).")
        return {"model": cfg.image_model, "pretrained": cfg.image_pretrained, "size": cfg.image_size,
                "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}

    def prepare(self, table: pa.Table, spec: dict[str, Any], ctx: Context) -> ImageData:
        paths = table.column("image_path").to_pylist()
        present = np.array([isinstance(p, str) and bool(p) for p in paths], dtype=bool)
        return ImageData(present, paths, spec["size"], tuple(spec["mean"]), tuple(spec["std"]))

    def collate(self, data: ImageData, rows: np.ndarray, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        from PIL import Image

        mean = np.asarray(data.mean, np.float32)[:, None, None]
        std = np.asarray(data.std, np.float32)[:, None, None]
        images = []
        for row in rows:
            with Image.open(data.paths[row]) as img:
                img = img.convert("RGB").resize((data.size, data.size), Image.BILINEAR)
                arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
            images.append((arr - mean) / std)
        return {"image": torch.from_numpy(np.stack(images))}

    def encoder(self, spec: dict[str, Any]) -> nn.Module:
        return ImageEncoder(spec["model"], spec["pretrained"])


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
