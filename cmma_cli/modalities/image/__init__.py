"""Images (micrographs, 2-D detector images): any timm backbone, imported only when this modality is used.

``cmma preprocess --image-dir`` records one image path per material. Each batch loads its images
(in the loader workers), converts them to RGB, resizes them to ``image_size`` squared and normalises
them with the backbone's mean and standard deviation. ``image_pretrained`` asks timm for pretrained
weights; where they cannot be downloaded, training starts from random weights with a warning.
Checkpoints hold the trained weights, so rebuilding the model never downloads anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cmma_cli.errors import CMMAError
from cmma_cli.modalities.base import Context, GatherContext, Item, Modality, Prepared, UserInputs

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Image files a user may give (micrographs, detector images).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def _timm():
    try:
        import timm
    except ImportError:
        raise CMMAError(
            "The image modality needs timm, which is not installed: `pip install 'cmma[images]'` "
            "(or train without images, e.g. --modalities structure,text,xrd)."
        ) from None
    except Exception as exc:  # timm is there, but its torchvision was built for another torch
        import torch

        raise CMMAError(
            f"timm is installed but does not import beside torch {torch.__version__} ({type(exc).__name__}: "
            f"{str(exc).strip()[:120]}): torchvision must be the build made for this torch (torch 2.N goes with "
            "torchvision 0.(N+15), both from the same index). Install such a pair, then `pip install 'cmma[images]'`; "
            "`make images` builds a venv with one (constraints-images.txt)."
        ) from None
    return timm


def image_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable image, or ``None`` when it opens."""
    try:
        from PIL import Image  # pillow comes with matplotlib, which pymatgen needs
    except ImportError:  # without pillow, trust the suffix
        return None if path.stat().st_size > 0 else "empty file"
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as exc:  # pillow raises many types for broken files
        return f"not a readable image ({type(exc).__name__})"
    return None


@dataclass
class ImagePreprocess:
    """Where images come from (``cmma preprocess``)."""

    dir: str | None = None  # folder of images <material_id>.png/.jpg/.tif


@dataclass
class ImageSettings:
    """The image encoder (``cmma train``)."""

    model: str = "resnet18"  # any timm model name (image modality only)
    pretrained: bool = True  # start from timm's pretrained weights where they can be downloaded
    size: int = 224  # images are resized to this many pixels square


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
    fields = (pa.field("image_path", pa.string()),)
    train_config = ImageSettings
    preprocess_config = ImagePreprocess
    folder_setting, folder_suffixes = "dir", IMAGE_SUFFIXES  # --image-dir

    # ------------------------------------------------------------------------------------ preprocess

    def gather(self, cfg: ImagePreprocess, ctx: GatherContext) -> dict[str, Any]:
        """``{material_id: image file}`` from ``--image-dir``; files that do not open are rejects."""
        images = {}
        for mid, path in self.folder_files(cfg, ctx).items():
            problem = image_problem(path)
            if problem:
                ctx.rejects.append({"source": "image", "item": str(path), "reason": problem})
            else:
                images[mid] = str(path)
        return images

    def featurize(self, item: Item, cfg: ImagePreprocess) -> dict[str, Any]:
        path = item.linked.get(self.name)
        return {"image_path": path} if path else {}

    # ----------------------------------------------------------------------------------------- train

    def spec(self, cfg: ImageSettings, table: pa.Table | None, ctx: Context) -> dict[str, Any]:
        timm = _timm()
        if not timm.list_models(cfg.model) and not timm.list_models(cfg.model.split(".")[0]):
            raise CMMAError(f"--image-model {cfg.model!r} is not a timm model name (see timm.list_models()).")
        return {"model": cfg.model, "pretrained": cfg.pretrained, "size": cfg.size,
                "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}

    def prepare(self, table: pa.Table, spec: dict[str, Any], ctx: Context) -> ImageData:
        paths = table.column("image_path").to_pylist()
        present = np.array([isinstance(p, str) and bool(p) for p in paths], dtype=bool)
        return ImageData(present, paths, spec["size"], tuple(spec["mean"]), tuple(spec["std"]))

    def collate(self, data: ImageData, rows: np.ndarray, rng: np.random.Generator | None) -> dict:
        import torch
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

    def encoder(self, spec: dict[str, Any]):
        from cmma_cli.modalities.image.encoder import ImageEncoder

        return ImageEncoder(spec["model"], spec["pretrained"])

    def loading_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        return {**spec, "pretrained": False}  # the checkpoint holds the weights: never download them

    # ---- embed and retrieve

    query_option = "image"
    query_help = "Query with an image (runs trained with images)."
    query_example = "--image FILE.png"
    input_help = f"images ({', '.join(IMAGE_SUFFIXES)})"

    def claim_input(self, path) -> int:
        from cmma_cli.modalities.user_files import suffix

        return 2 if suffix(path) in IMAGE_SUFFIXES else 0

    def read_inputs(self, paths, cfg) -> UserInputs:
        """Image files (id = the file stem) that open; the others are rejects."""
        out = UserInputs()
        images = []
        for path in map(Path, paths):
            problem = image_problem(path) if path.is_file() else "no such file"
            if problem:
                out.rejects.append({"source": self.name, "item": str(path), "reason": problem})
                continue
            out.ids.append(path.stem)
            images.append(str(path.resolve()))
            out.materials.append({"material_id": path.stem, "kind": self.name, "file": str(path)})
        out.values = {"image_path": images}
        return out

    def read_query(self, value, cfg) -> UserInputs:
        path = Path(value)
        got = self.read_inputs([path], cfg)
        if not got.ids:
            raise CMMAError(f"Could not open the image {path} ({got.rejects[0]['reason']}): pass a PNG, JPEG or TIFF file.")
        return got
