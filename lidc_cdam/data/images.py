"""Reading natural images into model inputs (resize + normalise), with clear errors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class ImageReadError(ValueError):
    """An image file that cannot be read; the message names the file."""


def model_normalization(model) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std the model's inputs are normalised with: from our checkpoint's metadata, else
    timm's pretrained config, else ImageNet's."""
    norm = model.meta.get("normalization") if hasattr(model, "meta") else None
    if norm:
        return tuple(norm["mean"]), tuple(norm["std"])
    cfg = getattr(getattr(model, "backbone", model), "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def load_image(path: str | Path, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """An RGB image file as a normalised ``[3, H, W]`` tensor, resized to ``size`` (bilinear,
    as the authors' evaluation loader resizes to 224 x 224)."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.functional import normalize, pil_to_tensor, resize

    path = Path(path)
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ImageReadError(f"{path}: not a readable image ({err})") from None
    tensor = pil_to_tensor(rgb).float() / 255.0
    tensor = resize(tensor, list(size), antialias=True)
    return normalize(tensor, list(mean), list(std))


def list_images(folder: str | Path) -> list[Path]:
    """Image files in ``folder`` (sorted); a clear error when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageReadError(f"{folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ImageReadError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files
