"""Multi-digit images: two real handwritten digits of different classes on a noisy canvas.

The project's embedded, offline data set (used by ``lidc-cdam demo``, the tests and the evaluation
benchmark). It is built from scikit-learn's shipped digits (:func:`sklearn.datasets.load_digits`:
1797 real 8 x 8 handwritten digits, nothing is downloaded) and gives, per image, the two classes
present, a pixel mask and a box per digit: ground truth for class-discriminative explanations.

Each image is a ``size x size`` RGB canvas (default 64 x 64) with a mildly noisy grey background and
exactly two digits of different classes, each upscaled ``scale`` times (default 3: 24 x 24 tiles)
with bicubic interpolation and placed at random integer offsets, multiples of ``grid``, such that
their tiles do not overlap and are at least ``gap`` pixels apart. By default (``grid=8``) the tiles
are aligned with the 8-pixel patches of the demo ViT: a tiny ViT trained from scratch learns
invariance to sub-patch shifts far too slowly for a CPU demo (``grid=1`` gives any offset). White
digits by default; ``colour=True`` gives each digit a random saturated colour. ``augment=True``
varies the handwriting (training-time augmentation). The defaults are the demo model's data.

Images are normalised for the model: ``(x - MEAN) / STD`` per channel with ``MEAN = STD = 0.5``,
i.e. ``[0, 1]`` pixel values map to ``[-1, 1]``; :meth:`MultiDigits.display_images` undoes it.

The 1797 sklearn digits are split once (stratified by class, fixed permutation) into a train and a
test pool, so ``split="test"`` images show handwriting the model never saw in training.

>>> data = make_multi_digits(256, split="test", seed=0)
>>> tuple(data.images.shape), tuple(data.masks.shape), tuple(data.boxes.shape)
((256, 3, 64, 64), (256, 2, 64, 64), (256, 2, 4))
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

Split = Literal["train", "test", "all"]
SPLITS: tuple[str, ...] = ("train", "test", "all")

NUM_CLASSES = 10
#: per-channel normalisation applied to the ``[0, 1]`` images: ``(x - MEAN) / STD``
MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
#: fraction of each class's sklearn digits that go to the test pool
TEST_FRACTION = 0.25
#: seed of the one fixed permutation that splits the sklearn digits into train / test pools
SPLIT_SEED = 1797
#: upscaled digit intensity (in ``[0, 1]``) above which a pixel belongs to the digit's mask
MASK_THRESHOLD = 0.3
_MAX_PLACEMENT_TRIES = 1000
_CHUNK = 256


@dataclass(frozen=True)
class MultiDigits:
    """A batch of multi-digit images and their ground truth (``n`` images of ``H x W`` pixels).

    Attributes:
        images: ``[n, 3, H, W]`` float32, normalised with :data:`MEAN` / :data:`STD` (range ``[-1, 1]``).
        labels: ``[n, 10]`` float32 multi-hot targets (exactly two ones per row).
        classes: ``[n, 2]`` int64, the two (distinct) digit classes in object order.
        masks: ``[n, 2, H, W]`` bool, the pixels of each digit (upscaled intensity above
            :data:`MASK_THRESHOLD`); never empty, never overlapping.
        boxes: ``[n, 2, 4]`` int64 tight boxes of the masks, ``(x0, y0, x1, y1)`` in pixels with
            exclusive ends (``masks[i, k, y0:y1, x0:x1]`` holds every mask pixel).
        digit_index: ``[n, 2]`` int64 index of each digit in ``sklearn.datasets.load_digits()``.
        split: the pool of sklearn digits drawn from (``"train"``, ``"test"`` or ``"all"``).
        config: the generation arguments (seed, size, scale...), plain values.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor
    digit_index: torch.Tensor
    split: str
    config: dict[str, Any]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int | slice | torch.Tensor | list[int]) -> MultiDigits:
        """A subset (an int keeps the batch dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return replace(
            self,
            images=self.images[index],
            labels=self.labels[index],
            classes=self.classes[index],
            masks=self.masks[index],
            boxes=self.boxes[index],
            digit_index=self.digit_index[index],
        )

    def display_images(self) -> torch.Tensor:
        """The images with the normalisation undone, ``[n, 3, H, W]`` in ``[0, 1]``."""
        return denormalize(self.images)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MultiDigits:
        """Move the images (and the other tensors, keeping their dtypes) to ``device``."""
        return replace(
            self,
            images=self.images.to(device=device, dtype=dtype),
            labels=self.labels.to(device=device, dtype=dtype),
            classes=self.classes.to(device),
            masks=self.masks.to(device),
            boxes=self.boxes.to(device),
            digit_index=self.digit_index.to(device),
        )


def normalize(images: torch.Tensor) -> torch.Tensor:
    """``[.., 3, H, W]`` images in ``[0, 1]`` to model input: ``(x - MEAN) / STD``."""
    mean = torch.tensor(MEAN, dtype=images.dtype, device=images.device)[:, None, None]
    std = torch.tensor(STD, dtype=images.dtype, device=images.device)[:, None, None]
    return (images - mean) / std


def _normalize_(images: torch.Tensor) -> torch.Tensor:
    """In-place :func:`normalize` of ``[n, 3, H, W]`` images (no copy of a large batch)."""
    for c in range(3):
        images[:, c].sub_(MEAN[c]).div_(STD[c])
    return images


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`, clamped to ``[0, 1]`` (for display)."""
    mean = torch.tensor(MEAN, dtype=images.dtype, device=images.device)[:, None, None]
    std = torch.tensor(STD, dtype=images.dtype, device=images.device)[:, None, None]
    return (images * std + mean).clamp(0, 1)


def box_masks(boxes: torch.Tensor, size: tuple[int, int], margin: int = 0) -> torch.Tensor:
    """Boolean masks ``[..., H, W]`` of ``(x0, y0, x1, y1)`` boxes ``[..., 4]`` (exclusive ends),
    grown by ``margin`` pixels on every side and clipped to the image."""
    h, w = size
    x0, y0, x1, y1 = (boxes[..., i, None] for i in range(4))
    ys = torch.arange(h, device=boxes.device)
    xs = torch.arange(w, device=boxes.device)
    rows = (ys >= y0 - margin) & (ys < y1 + margin)  # [..., H]
    cols = (xs >= x0 - margin) & (xs < x1 + margin)  # [..., W]
    return rows[..., :, None] & cols[..., None, :]


@lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0  # [1797, 8, 8] in [0, 1]
    return images, np.asarray(bunch.target, dtype=np.int64)


@lru_cache(maxsize=4)
def _upscaled_digits(scale: int) -> np.ndarray:
    """All sklearn digits upscaled ``scale`` times (bicubic, clamped to ``[0, 1]``)."""
    images, _ = _sklearn_digits()
    if scale == 1:
        return images
    up = F.interpolate(torch.from_numpy(images)[:, None], scale_factor=scale, mode="bicubic",
                       align_corners=False)
    return up[:, 0].clamp_(0, 1).cpu().numpy()


@lru_cache(maxsize=4)
def digit_pool(split: Split) -> np.ndarray:
    """Sorted indices into ``load_digits()`` of the digits available to ``split``.

    The train and test pools are disjoint and fixed: per class, a permutation seeded with
    :data:`SPLIT_SEED` puts ``round(TEST_FRACTION * count)`` digits in the test pool.
    """
    _check_split(split)
    _, targets = _sklearn_digits()
    if split == "all":
        return np.arange(len(targets))
    rng = np.random.default_rng(SPLIT_SEED)
    test = []
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(targets == c)
        test.append(rng.permutation(members)[: round(TEST_FRACTION * len(members))])
    test_idx = np.sort(np.concatenate(test))
    if split == "test":
        return test_idx
    return np.setdiff1d(np.arange(len(targets)), test_idx)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _random_colours(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Saturated bright RGB colours ``[*shape, 3]``: hue uniform, saturation in [0.5, 1], value in
    [0.8, 1] (HSV to RGB, vectorised)."""
    h, s, v = rng.uniform(0, 1, shape), rng.uniform(0.5, 1.0, shape), rng.uniform(0.8, 1.0, shape)
    sector = np.floor(h * 6).astype(np.int64) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack([  # rows: sector; columns: r, g, b
        np.stack([v, t, p], -1), np.stack([q, v, p], -1), np.stack([p, v, t], -1),
        np.stack([p, q, v], -1), np.stack([t, p, v], -1), np.stack([v, p, q], -1),
    ])
    return np.take_along_axis(table, sector[None, ..., None], 0)[0].astype(np.float32)


def _place_pairs(
    rng: np.random.Generator, n: int, size: int, tile: int, gap: int, grid: int
) -> np.ndarray:
    """Top-left corners ``[n, 2, (y, x)]`` of two ``tile``-square tiles per image, multiples of
    ``grid``, at least ``gap`` pixels apart (rejection sampling: uniform over valid placements)."""
    cells = (size - tile) // grid + 1
    corners = rng.integers(0, cells, size=(n, 2, 2)) * grid
    for _ in range(_MAX_PLACEMENT_TRIES):
        dist = np.abs(corners[:, 0] - corners[:, 1]).max(-1)
        bad = np.flatnonzero(dist < tile + gap)
        if bad.size == 0:
            return corners
        corners[bad] = rng.integers(0, cells, size=(bad.size, 2, 2)) * grid
    raise RuntimeError("could not place two non-overlapping digits")  # pragma: no cover


def _tile_boxes(tiles: np.ndarray) -> np.ndarray:
    """Tight box ``(x0, y0, x1, y1)`` of each tile's mask ``[..., 4]`` from tiles ``[..., T, T]``."""
    masks = tiles > MASK_THRESHOLD
    rows, cols = masks.any(-1), masks.any(-2)  # [..., T]
    tile = masks.shape[-1]
    first = lambda a: a.argmax(-1)  # noqa: E731
    last = lambda a: tile - a[..., ::-1].argmax(-1)  # noqa: E731
    return np.stack([first(cols), first(rows), last(cols), last(rows)], -1)


def _augment_tiles(tiles: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random handwriting variation of digit tiles ``[..., T, T]``: an affine warp about the tile
    centre (rotation within 10 degrees, scale 0.9-1.1, shear within 0.1), then a gamma on the
    intensity (0.8-1.25, thinner or thicker strokes), renormalised to a peak of 1."""
    shape = tiles.shape
    flat = torch.from_numpy(np.ascontiguousarray(tiles.reshape(-1, 1, *shape[-2:])))
    m = flat.shape[0]
    angle = np.deg2rad(rng.uniform(-10, 10, m))
    scale = rng.uniform(0.9, 1.1, m)
    shear = rng.uniform(-0.1, 0.1, m)
    gamma = np.exp(rng.uniform(np.log(0.8), np.log(1.25), m))
    cos, sin = np.cos(angle), np.sin(angle)
    # output -> input sampling map: inverse scale of rotation @ shear
    theta = np.zeros((m, 2, 3))
    theta[:, 0, 0], theta[:, 0, 1] = cos / scale, (cos * shear - sin) / scale
    theta[:, 1, 0], theta[:, 1, 1] = sin / scale, (sin * shear + cos) / scale
    grid = F.affine_grid(torch.from_numpy(theta).float(), list(flat.shape), align_corners=False)
    warped = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    warped = warped.clamp_(0, 1).pow_(torch.from_numpy(gamma).float()[:, None, None, None])
    warped /= warped.amax((2, 3), keepdim=True).clamp_(min=1e-6)
    return warped.cpu().numpy().reshape(shape)


def make_multi_digits(
    n: int,
    *,
    split: Split = "train",
    seed: int = 0,
    size: int = 64,
    scale: int = 3,
    colour: bool = False,
    noise: float = 0.05,
    background: tuple[float, float] = (0.0, 0.3),
    gap: int = 2,
    grid: int = 8,
    augment: bool = False,
) -> MultiDigits:
    """``n`` images with two digits of different classes each (see the module docstring).

    Args:
        n: number of images (>= 1).
        split: the pool of sklearn digits: ``"train"``, ``"test"`` (disjoint handwriting) or ``"all"``.
        seed: the result is a deterministic function of all arguments.
        size: canvas height and width in pixels; must fit two tiles side by side
            (``size >= 2 * 8 * scale + gap``).
        scale: integer upscaling of the 8 x 8 digits (bicubic).
        colour: a random saturated colour per digit; otherwise digits are white.
        noise: standard deviation of the Gaussian pixel noise on the background (``[0, 1]`` scale).
        background: range of the uniform random grey level of each image's background.
        gap: minimum distance in pixels between the two digit tiles.
        grid: digit tiles are placed at offsets that are multiples of ``grid`` pixels: 8 (the
            default, the demo ViT's patch size) aligns digits with the patches, 1 allows any offset.
        augment: vary each digit's handwriting (small random rotation, scale, shear and stroke
            width; masks and boxes follow): training-time augmentation.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    _check_split(split)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    if isinstance(scale, bool) or not isinstance(scale, int | np.integer) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    if isinstance(gap, bool) or not isinstance(gap, int | np.integer) or gap < 0:
        raise ValueError(f"gap must be a non-negative integer, got {gap!r}")
    if isinstance(grid, bool) or not isinstance(grid, int | np.integer) or grid < 1:
        raise ValueError(f"grid must be a positive integer, got {grid!r}")
    tile = 8 * int(scale)
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 2 * tile + gap:
        raise ValueError(
            f"size must be an integer >= 2 * 8 * scale + gap = {2 * tile + gap} so that two "
            f"{tile}x{tile} digits fit without overlapping, got {size!r}"
        )
    if (size - tile) // grid * grid < tile + gap:
        raise ValueError(f"grid {grid} leaves no two non-overlapping positions on a {size} canvas")
    if not (np.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    lo, hi = background
    if not (0.0 <= lo <= hi <= 1.0):
        raise ValueError(f"background must be a (low, high) range inside [0, 1], got {background!r}")

    n, size, scale, gap, grid = int(n), int(size), int(scale), int(gap), int(grid)
    digits = _upscaled_digits(scale)
    _, targets = _sklearn_digits()
    pool = digit_pool(split)
    rng = np.random.default_rng(seed)
    # what each image holds, drawn for the whole batch at once
    first = rng.integers(NUM_CLASSES, size=n)  # an ordered pair of distinct classes, uniformly
    classes = np.stack([first, (first + 1 + rng.integers(NUM_CLASSES - 1, size=n)) % NUM_CLASSES], 1)
    by_class = pool[np.argsort(targets[pool], kind="stable")]
    counts = np.bincount(targets[pool], minlength=NUM_CLASSES)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    digit_index = by_class[offsets[classes] + rng.integers(0, counts[classes])]  # [n, 2]
    corners = _place_pairs(rng, n, size, tile, gap, grid)  # [n, 2, (y, x)]
    colours = _random_colours(rng, (n, 2)) if colour else np.ones((n, 2, 3), dtype=np.float32)
    levels = rng.uniform(lo, hi, size=n).astype(np.float32)

    tiles = digits[digit_index]  # [n, 2, tile, tile]
    if augment:
        tiles = _augment_tiles(tiles, rng)
    boxes = _tile_boxes(tiles) + np.tile(corners[..., ::-1], 2)  # [n, 2, 4]
    images = np.empty((n, 3, size, size), dtype=np.float32)
    masks = np.empty((n, 2, size, size), dtype=bool)
    span = np.arange(tile)
    for lo_i in range(0, n, _CHUNK):  # paint in chunks to bound the memory of the alpha maps
        sl = slice(lo_i, min(n, lo_i + _CHUNK))
        m = sl.stop - sl.start
        alpha = np.zeros((m, 2, size, size), dtype=np.float32)
        rows = corners[sl, :, 0, None, None] + span[:, None]
        cols = corners[sl, :, 1, None, None] + span
        alpha[np.arange(m)[:, None, None, None], np.arange(2)[:, None, None], rows, cols] = tiles[sl]
        canvas = images[sl]
        rng.standard_normal(dtype=np.float32, out=canvas)
        canvas *= noise
        canvas += levels[sl, None, None, None]
        canvas *= 1 - alpha.sum(1, keepdims=True)  # the two digits never overlap
        for k in range(2):
            canvas += colours[sl, k, :, None, None] * alpha[:, k, None]
        np.clip(canvas, 0, 1, out=canvas)
        np.greater(alpha, MASK_THRESHOLD, out=masks[sl])

    labels = np.zeros((n, NUM_CLASSES), dtype=np.float32)
    np.put_along_axis(labels, classes, 1.0, axis=1)
    config = dict(n=n, split=split, seed=int(seed), size=size, scale=scale, colour=bool(colour),
                  noise=float(noise), background=[float(lo), float(hi)], gap=gap, grid=grid,
                  augment=bool(augment),
                  mean=list(MEAN), std=list(STD))
    return MultiDigits(
        images=_normalize_(torch.from_numpy(images)),
        labels=torch.from_numpy(labels),
        classes=torch.from_numpy(classes),
        masks=torch.from_numpy(masks),
        boxes=torch.from_numpy(boxes),
        digit_index=torch.from_numpy(digit_index),
        split=split,
        config=config,
    )
