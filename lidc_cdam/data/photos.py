"""Real photographs that ship with scikit-image and matplotlib (CC0 / public domain), as labelled classes, and
X_multi-style composites of 2-4 of them with known object regions (the real-photos benchmark).

Classes (:data:`PHOTO_CLASSES`; licences as the libraries state them): person (scikit-image ``astronaut``,
NASA, public domain; ``camera``, CC0; matplotlib ``grace_hopper.jpg``, US Navy, public domain), cat
(``chelsea``, CC0), cup (``coffee``, CC0), rocket (``rocket``, SpaceX, public domain), coins (``coins``,
public domain), brick, grass and gravel (CC0 textures), galaxies (``hubble_deep_field``, NASA, public domain).

:func:`make_photo_composites` draws each image deterministically from ``(seed, index)``: 2, 3 or 4 photos of
different classes, each a random crop (at least ``min_scale`` of the photo's shorter side) resized into its tile
of the canvas (halves, a half and two quarters, or quarters, on the patch grid); one mask per photo (its tile).
The first two photos are the image's two classes (the benchmark explains the one with the higher logit, c1,
and uses the other as c2); the others are distractors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from torch.nn import functional as F

#: class -> (library, image name) of its photographs
PHOTO_CLASSES: dict[str, tuple[tuple[str, str], ...]] = {
    "person": (("skimage", "astronaut"), ("skimage", "camera"), ("matplotlib", "grace_hopper.jpg")),
    "cat": (("skimage", "chelsea"),),
    "cup": (("skimage", "coffee"),),
    "rocket": (("skimage", "rocket"),),
    "coins": (("skimage", "coins"),),
    "brick": (("skimage", "brick"),),
    "grass": (("skimage", "grass"),),
    "gravel": (("skimage", "gravel"),),
    "galaxies": (("skimage", "hubble_deep_field"),),
}
CLASS_NAMES: tuple[str, ...] = tuple(PHOTO_CLASSES)


def _read(library: str, name: str) -> np.ndarray:
    if library == "skimage":
        from skimage import data

        image = getattr(data, name)()
    else:
        import matplotlib.cbook
        import matplotlib.image

        with matplotlib.cbook.get_sample_data(name) as fh:
            image = matplotlib.image.imread(fh, format=name.rsplit(".", 1)[-1])
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8) if image.max() <= 1 else image.astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.array(image[..., :3], copy=True, order="C")


@cache
def load_photos() -> dict[str, tuple[torch.Tensor, ...]]:
    """class -> its photographs as ``[3, H, W]`` float tensors in ``[0, 1]`` (read once)."""
    return {c: tuple(torch.from_numpy(_read(*src)).permute(2, 0, 1).float() / 255.0 for src in sources)
            for c, sources in PHOTO_CLASSES.items()}


def random_crop(photo: torch.Tensor, out_hw: tuple[int, int], gen: torch.Generator, min_scale: float = 0.3,
                flip: bool = True) -> torch.Tensor:
    """A random crop of ``photo`` with the aspect of ``out_hw`` (side at least ``min_scale`` of the largest that
    fits), resized to ``out_hw`` (bilinear, antialiased), flipped horizontally half of the time."""
    _, H, W = photo.shape
    aspect = out_hw[1] / out_hw[0]
    full_h = min(H, int(W / aspect))
    scale = min_scale + (1 - min_scale) * float(torch.rand((), generator=gen))
    h = max(8, int(full_h * scale))
    w = max(8, min(W, int(h * aspect)))
    y = int(torch.randint(0, H - h + 1, (), generator=gen))
    x = int(torch.randint(0, W - w + 1, (), generator=gen))
    crop = F.interpolate(photo[None, :, y:y + h, x:x + w], size=out_hw, mode="bilinear", antialias=True,
                         align_corners=False)[0].clamp(0, 1)
    if flip and bool(torch.rand((), generator=gen) < 0.5):
        crop = crop.flip(-1)
    return crop


def tiles(k: int, size: int, horizontal: bool) -> list[tuple[int, int, int, int]]:
    """``k`` (2-4) tiles ``(y0, y1, x0, x1)`` covering a ``size`` canvas: halves, a half and two quarters,
    or quarters (``horizontal``: the first split is left | right)."""
    h = size // 2
    if k == 2:
        boxes = [(0, size, 0, h), (0, size, h, size)]
    elif k == 3:
        boxes = [(0, size, 0, h), (0, h, h, size), (h, size, h, size)]
    elif k == 4:
        boxes = [(0, h, 0, h), (0, h, h, size), (h, size, 0, h), (h, size, h, size)]
    else:
        raise ValueError(f"a composite holds 2 to 4 photos, got {k}")
    return boxes if horizontal else [(x0, x1, y0, y1) for y0, y1, x0, x1 in boxes]


@dataclass(frozen=True)
class PhotoComposite:
    """One composite: ``image`` ``[3, S, S]`` in ``[0, 1]``, the class index of each photo (the first two are
    the image's classes) and one tile mask per photo ``[k, S, S]``."""

    image: torch.Tensor
    classes: list[int]
    masks: torch.Tensor


def make_photo_composite(index: int, *, size: int = 112, seed: int = 0, min_scale: float = 0.3,
                         classes: Sequence[str] = CLASS_NAMES) -> PhotoComposite:
    """Composite number ``index`` of the stream ``seed`` (deterministic; see the module text)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    photos = load_photos()
    k = int(torch.randint(2, 5, (), generator=gen))
    chosen = torch.randperm(len(classes), generator=gen)[:k].tolist()
    horizontal = bool(torch.rand((), generator=gen) < 0.5)
    image = torch.zeros(3, size, size)
    masks = torch.zeros(k, size, size, dtype=torch.bool)
    for j, (c, (y0, y1, x0, x1)) in enumerate(zip(chosen, tiles(k, size, horizontal), strict=True)):
        pool = photos[classes[c]]
        photo = pool[int(torch.randint(0, len(pool), (), generator=gen))]
        image[:, y0:y1, x0:x1] = random_crop(photo, (y1 - y0, x1 - x0), gen, min_scale)
        masks[j, y0:y1, x0:x1] = True
    return PhotoComposite(image, chosen, masks)


def normalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``[..., 3, H, W]`` in ``[0, 1]`` to model inputs."""
    m = torch.tensor(list(mean)).view(3, 1, 1)
    s = torch.tensor(list(std)).view(3, 1, 1)
    return (image - m) / s
