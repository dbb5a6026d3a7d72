"""ImageNet for the evaluation (paper section 3.5, docs/method.md, "Data"): the class order and names, the X_val /
X_multi manifest files and the image loaders. How the two image sets are drawn is
:mod:`lidc_cdam.data.imagenet_subsets`.

* Manifests: CSV files of validation images (``image``, ``val_index``, for X_multi the class pair ``c1``, ``c2``;
  :func:`write_manifest`, :func:`load_manifest`); entries are relative paths inside the data root
  (:func:`safe_relative_path`).
* :class:`ImageNetValImages`: manifest rows as model inputs, resized to 224 x 224 with ImageNet
  mean/std (docs/method.md, "Evaluation": the authors' evaluation loader), from a flat validation folder or one
  folder per synset; unreadable files raise or are skipped and reported.
* :class:`SynsetImages`: a training/validation folder in the synset layout, labels in timm's class
  order (sorted WordNet ids = the standard ImageNet-1k indices), for the linear probe.

The committed files are ``data_manifest/imagenet_xval.csv`` and ``data_manifest/imagenet_xmulti.csv``
(rebuilt by ``lidc-cdam imagenet-manifests``); see ``data_manifest/README.md``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from lidc_cdam.data.images import IMAGE_SUFFIXES, IMAGENET_MEAN, IMAGENET_STD, ImageReadError, load_image
from lidc_cdam.io import atomic_write

log = logging.getLogger(__name__)

NUM_VAL_IMAGES = 50_000
NUM_CLASSES = 1000

VAL_NAME_RE = re.compile(r"^ILSVRC2012_val_(\d{8})\.[A-Za-z]+$")

OnError = Literal["raise", "skip"]


class ManifestError(ValueError):
    """A manifest (or ReaL label file) that is malformed or points outside the data root."""


def val_image_name(val_index: int) -> str:
    """File name of the 1-based validation image ``val_index``: ``ILSVRC2012_val_00000001.JPEG``."""
    return f"ILSVRC2012_val_{val_index:08d}.JPEG"


# --------------------------------------------------------------------------- class names (timm)
@lru_cache(maxsize=1)
def _imagenet_info():
    from timm.data import ImageNetInfo

    return ImageNetInfo("imagenet-1k")


def imagenet_synsets() -> list[str]:
    """The 1000 WordNet ids in class-index order (timm's ImageNetInfo; sorted ids = standard order)."""
    return list(_imagenet_info().label_names())


def class_lemmas() -> list[list[str]]:
    """Each class's names (WordNet lemmas) from timm's descriptions: ``["laptop", "laptop computer"]``."""
    info = _imagenet_info()
    return [[s.strip() for s in info.index_to_description(i).split(", ")] for i in range(NUM_CLASSES)]


def class_names() -> list[str]:
    """Short unique class names: the first lemma, with the synset id added where two classes share it
    (``crane (n02012849)`` the bird, ``crane (n03126707)`` the machine; also ``maillot``)."""
    first = [lemmas[0] for lemmas in class_lemmas()]
    synsets = imagenet_synsets()
    counts: dict[str, int] = {}
    for name in first:
        counts[name] = counts.get(name, 0) + 1
    return [f"{n} ({s})" if counts[n] > 1 else n for n, s in zip(first, synsets, strict=True)]


# --------------------------------------------------------------------------- manifest files
_LIST_COLUMNS = ("real_labels",)
_INT_COLUMNS = ("val_index", "c1", "c2")


def write_manifest(rows: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a manifest CSV atomically; list columns as JSON (``[417, 681]``), floats with 4 decimals."""
    out = rows.copy()
    for col in _LIST_COLUMNS:
        if col in out:
            out[col] = [json.dumps([int(c) for c in v]) for v in out[col]]
    return atomic_write(path, lambda tmp: out.to_csv(tmp, index=False, float_format="%.4f", lineterminator="\n"))


def load_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """A manifest CSV (X_val or X_multi) as a DataFrame: ``image`` (file name), ``val_index``, and
    for X_multi ``c1``, ``c2`` (ints); ``real_labels`` parsed to lists of ints."""
    path = Path(path)
    try:
        rows = pd.read_csv(path, dtype={"image": str}, keep_default_na=False)
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: not a readable CSV manifest ({err})") from None
    if "image" not in rows:
        raise ManifestError(f"{path}: no 'image' column (columns: {list(rows.columns)})")
    try:
        for col in _INT_COLUMNS:
            if col in rows:
                rows[col] = rows[col].astype(int)
        for col in _LIST_COLUMNS:
            if col in rows:
                rows[col] = [[int(c) for c in json.loads(v)] if v != "" else [] for v in rows[col]]
    except (ValueError, TypeError) as err:
        raise ManifestError(f"{path}: malformed column values ({err})") from None
    if {"c1", "c2"} - set(rows) and {"c1", "c2"} & set(rows):
        raise ManifestError(f"{path}: has only one of the columns c1, c2")
    return rows


def safe_relative_path(entry: str) -> PurePosixPath:
    """A manifest entry as a relative path inside the data root; :class:`ManifestError` for absolute
    paths, drive letters, ``..`` components or empty names."""
    text = str(entry).strip()
    win = PureWindowsPath(text)
    posix = PurePosixPath(text.replace("\\", "/"))
    if not text or posix.is_absolute() or win.is_absolute() or win.drive or ".." in posix.parts:
        raise ManifestError(f"manifest entry {entry!r} must be a file name or a relative path inside the "
                            "data root (no absolute paths, no '..')")
    return posix


# --------------------------------------------------------------------------- image folders
def index_val_images(root: str | os.PathLike) -> dict[str, Path]:
    """Image files in ``root`` and in its sub-folders one level down (``val/n01440764/*.JPEG``),
    by file name and by stem (so ``ILSVRC2012_val_00000001.JPEG`` also finds a ``.png`` copy).
    The first file in sorted order wins when a name occurs twice."""
    root = Path(root)
    if not root.is_dir():
        raise ImageReadError(f"{root}: not a folder (the ImageNet validation images)")
    index: dict[str, Path] = {}
    stems: dict[str, Path] = {}

    def add(entries: Iterable[os.DirEntry]) -> list[os.DirEntry]:
        dirs = []
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.is_dir():
                dirs.append(entry)
            elif Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                path = Path(entry.path)
                index.setdefault(entry.name, path)
                stems.setdefault(path.stem, path)
        return dirs

    with os.scandir(root) as top:
        subdirs = add(top)
    for sub in subdirs:
        with os.scandir(sub.path) as entries:
            add(entries)
    for stem, path in stems.items():
        index.setdefault(f"stem:{stem}", path)
    return index


class ImageNetValImages(Dataset):
    """Manifest rows (X_val / X_multi) as normalised model inputs.

    ``root`` holds the validation images flat (``ILSVRC2012_val_*.JPEG``) or in one folder per synset;
    files are found by name (index built once, :func:`index_val_images`). A manifest entry with a
    ``/`` is read as a path relative to ``root``. Entries that are absolute or contain ``..`` are
    rejected (:class:`ManifestError`) when the data set is built.

    Items: ``{"image": [3, H, W] tensor, "image_id": file name, "classes": [c1, c2] or [],
    "val_index": int}``. A missing or unreadable file raises :class:`ImageReadError` naming it
    (``on_error="raise"``), or gives ``None`` and is listed in :attr:`skipped` (``on_error="skip"``;
    recorded in the process that reads the item).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        rows: pd.DataFrame | str | os.PathLike,
        image_size: int | tuple[int, int] = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        on_error: OnError = "raise",
        index: Mapping[str, Path] | None = None,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.root = Path(root)
        self.rows = (rows if isinstance(rows, pd.DataFrame) else load_manifest(rows)).reset_index(drop=True)
        if "image" not in self.rows:
            raise ManifestError(f"manifest rows have no 'image' column (columns: {list(self.rows.columns)})")
        self.entries = [safe_relative_path(e) for e in self.rows["image"]]
        self.size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.on_error = on_error
        self.index = dict(index) if index is not None else index_val_images(self.root)
        has_pairs = {"c1", "c2"} <= set(self.rows)
        self.classes = ([[int(a), int(b)] for a, b in zip(self.rows["c1"], self.rows["c2"], strict=True)]
                        if has_pairs else [[] for _ in range(len(self.rows))])
        self.val_index = ([int(v) for v in self.rows["val_index"]] if "val_index" in self.rows
                          else [-1] * len(self.rows))
        self._skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """``(file, reason)`` of the items that could not be read (``on_error="skip"``)."""
        return list(self._skipped.items())

    def path(self, i: int) -> Path:
        """The file of row ``i``; :class:`ImageReadError` when it is not under the root."""
        entry = self.entries[i]
        if len(entry.parts) > 1:
            path = self.root / entry
            if path.is_file():
                return path
        else:
            path = self.index.get(entry.name) or self.index.get(f"stem:{PurePosixPath(entry.name).stem}")
            if path is not None:
                return path
        raise ImageReadError(f"{self.root / entry}: no such file under the data root {self.root} "
                             "(looked in it and in its synset folders)")

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        if not 0 <= i < len(self):
            raise IndexError(i)
        name = self.entries[i].name
        try:
            image = load_image(self.path(i), self.size, self.mean, self.std)
        except ImageReadError as err:
            if self.on_error == "raise":
                raise
            if name not in self._skipped:
                log.warning("skipping %s", err)
            self._skipped.pop(name, None)  # the latest skip last: skipped[-1] is this item's
            self._skipped[name] = str(err)
            return None
        return {"image": image, "image_id": name, "classes": list(self.classes[i]),
                "val_index": self.val_index[i]}


def collate_items(items: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """DataLoader ``collate_fn`` for :class:`ImageNetValImages`: drops skipped (``None``) items, stacks
    the images, keeps ids and class lists as lists; ``None`` when every item was skipped."""
    kept = [it for it in items if it is not None]
    if not kept:
        return None
    return {"image": torch.stack([it["image"] for it in kept]), "image_id": [it["image_id"] for it in kept],
            "classes": [it["classes"] for it in kept], "val_index": torch.tensor([it["val_index"] for it in kept])}


@dataclass(frozen=True)
class Skipped:
    """An unreadable training image (returned by :class:`SynsetImages` with ``on_error="skip"``)."""

    file: str
    reason: str


def synset_folders(root: str | os.PathLike) -> list[str]:
    """Sorted names of the sub-folders of ``root`` (one per class in the synset layout)."""
    root = Path(root)
    if not root.is_dir():
        raise ImageReadError(f"{root}: not a folder (expected one sub-folder per synset)")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ImageReadError(f"{root}: no class sub-folders (expected e.g. {root}/n01440764/*.JPEG)")
    return folders


class SynsetImages(Dataset):
    """Images of a folder in the synset layout (``train/n01440764/*.JPEG``) with class labels.

    ``classes`` maps folder names to label indices (e.g. ``{synset: i}`` in timm's order); folders not
    in it are ignored. ``transform`` turns an RGB PIL image into a tensor; without it images are
    resized to ``image_size`` and normalised like the evaluation images. Items are ``(image, label)``;
    an unreadable file raises :class:`ImageReadError` or, with ``on_error="skip"``, gives a
    :class:`Skipped` (works in DataLoader workers; see :func:`collate_labelled`).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        classes: Mapping[str, int],
        transform: Callable[[Any], torch.Tensor] | None = None,
        image_size: int | tuple[int, int] = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        on_error: OnError = "raise",
        max_per_class: int | None = None,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.root = Path(root)
        self.samples: list[tuple[Path, int]] = []
        for folder in synset_folders(self.root):
            if folder not in classes:
                continue
            files = sorted(p for p in (self.root / folder).iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            self.samples.extend((p, int(classes[folder])) for p in files[:max_per_class])
        if not self.samples:
            raise ImageReadError(f"{self.root}: no images in the class folders {sorted(classes)[:5]}...")
        self.transform = transform
        self.size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.on_error = on_error

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | Skipped:
        path, label = self.samples[i]
        try:
            if self.transform is None:
                return load_image(path, self.size, self.mean, self.std), label
            return self.transform(read_rgb(path)), label
        except ImageReadError as err:
            if self.on_error == "raise":
                raise
            return Skipped(str(path), str(err))


def read_rgb(path: str | os.PathLike):
    """An image file as an RGB PIL image; :class:`ImageReadError` naming the file when unreadable."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ImageReadError(f"{path}: not a readable image ({err})") from None


def collate_labelled(items: Sequence[tuple[torch.Tensor, int] | Skipped]):
    """``collate_fn`` for :class:`SynsetImages`: ``(images, labels, skipped)``; images and labels are
    ``None`` when every item of the batch was skipped."""
    skipped = [it for it in items if isinstance(it, Skipped)]
    kept = [it for it in items if not isinstance(it, Skipped)]
    if not kept:
        return None, None, skipped
    return torch.stack([im for im, _ in kept]), torch.tensor([lab for _, lab in kept]), skipped
