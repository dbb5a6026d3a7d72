"""MONAI datasets and transforms for the model input (docs/method.md, "Data"), from a preprocessed (or phantom) folder.

The dict transforms wrap the array forms of :mod:`lidc_cdam.data.lidc.model_input` (the one model-input contract,
which the CT path calls directly). Model input: the central slice of the 32^3 crop (index 16; a random index in
14-18 when training) in the axial, coronal or sagittal view, repeated to 3 channels, resized to 224 x 224,
z-scored with statistics of the training crops, rotated by a random multiple of 90 degrees when training
(``rotation="any"``: by any angle, bilinear, edges repeated, and mirrored half the time: every rating is
invariant to both, and a shape cue such as elongation is then seen in every direction, not four).
Targets: ``label`` (malignancy 0/1) for classification, ``biomarkers`` (the eight, standardised with mean
and std fitted on the training part only) for regression. Crops are ``[z, y, x]``: axial = ``[16, :, :]``,
coronal = ``[:, 16, :]``, sagittal = ``[:, :, 16]``.

The ``"3d"`` view (3D backbones, e.g. MONAI's ViT) is the whole crop as ``[1, z, y, x]`` (resampled trilinearly
to ``size``^3 if ``size`` is not 32), z-scored the same way, rotated by a random multiple of 90 degrees in the
axial (y, x) plane when training; there is no slice jitter.

>>> parts = lidc_datasets("phantoms/", fold=0, view="axial", task="classification")
>>> parts["train"][0]["image"].shape  # torch.Size([3, 224, 224])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.data import CacheDataset, Dataset
from monai.transforms import (
    Compose,
    MapTransform,
    RandFlipd,
    RandomizableTransform,
    RandRotate90d,
    RandRotated,
    Resized,
    ToTensord,
)

from lidc_cdam.data.lidc.errors import LidcError
from lidc_cdam.data.lidc.folds import read_folds
from lidc_cdam.data.lidc.model_input import (
    CENTRE,
    CROP_SIZE,
    IMAGE_SIZE,
    TRAIN_SLICES,
    VIEWS,
    VOLUME,
    plane_input,
    slice_plane,
    volume_input,
)
from lidc_cdam.data.lidc.nodule_inputs import check_crop_paths as check_crop_paths  # re-exported (moved)
from lidc_cdam.data.lidc.nodules import BIOMARKERS

#: the training rotations: ``"quarter"`` (a random multiple of 90 degrees, with probability ``rotate_prob``) or
#: ``"any"`` (any angle in the axial plane with probability ``rotate_prob``, then a mirror with probability 1/2)
ROTATIONS = ("quarter", "any")

__all__ = [
    "CENTRE",
    "CROP_SIZE",
    "IMAGE_SIZE",
    "ROTATIONS",
    "TRAIN_SLICES",
    "VIEWS",
    "VOLUME",
    "LoadCropd",
    "ModelInputd",
    "SliceViewd",
    "Stats",
    "VolumeInputd",
    "check_crop_paths",
    "checkpoint_dataset",
    "fit_stats",
    "lidc_datasets",
    "transforms",
    "volume_transforms",
]
TASKS = ("classification", "regression")


class LoadCropd(MapTransform):
    """``d[key]`` (a crop ``.npz`` path) -> the crop as float32 HU ``[z, y, x]``; also ``mask``."""

    def __init__(self, keys: str = "image", root: str | Path | None = None):
        super().__init__(keys)
        self.root = Path(root) if root is not None else None

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = Path(d[key]) if self.root is None else self.root / d[key]
            with np.load(path, allow_pickle=False) as crop:
                d[key] = crop["image"].astype(np.float32)
                d["mask"] = crop["mask"].astype(np.float32)
        return d


class SliceViewd(RandomizableTransform, MapTransform):
    """One slice of a ``[z, y, x]`` volume along ``view``, as ``[1, H, W]``: index ``index``, or a random
    index in ``random_range`` (inclusive) when given."""

    def __init__(self, keys=("image", "mask"), view: str = "axial", index: int = CENTRE,
                 random_range: tuple[int, int] | None = None, allow_missing_keys: bool = True):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        if view not in VIEWS:
            raise ValueError(f"view must be one of {list(VIEWS)}, got {view!r}")
        self.view = view
        self.index = index
        self.random_range = random_range
        self._i = index

    def randomize(self, data: Any = None) -> None:
        if self.random_range is not None:
            lo, hi = self.random_range
            self._i = int(self.R.randint(lo, hi + 1))
        else:
            self._i = self.index

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        self.randomize()
        d = dict(data)
        d["slice_index"] = self._i
        for key in self.key_iterator(d):
            d[key] = np.ascontiguousarray(slice_plane(d[key], self.view, self._i))[None]
        return d


class ModelInputd(MapTransform):
    """``d[key]`` (one HU plane ``[1, h, w]``) -> ``[3, size, size]``: :func:`~lidc_cdam.data.lidc.model_input.
    plane_input` (3 channels, bilinear resize, z-scored with ``stats``). The crops are already in the HU window."""

    def __init__(self, keys: str, stats: Stats, size: int):
        super().__init__(keys)
        self.stats, self.size = {"mean": stats.mean, "std": stats.std}, int(size)

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = plane_input(np.asarray(d[key], dtype=np.float32)[None], self.stats, self.size)[0]
        return d


class VolumeInputd(ModelInputd):
    """``d[key]`` (the crop ``[z, y, x]``) -> ``[1, size, size, size]``: :func:`~lidc_cdam.data.lidc.model_input.
    volume_input` (trilinear resize when ``size`` is not 32, z-scored with ``stats``)."""

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = volume_input(np.asarray(d[key], dtype=np.float32), self.stats, self.size)[0]
        return d


class AddChanneld(MapTransform):
    """``d[key]`` ``[z, y, x]`` -> ``[1, z, y, x]``."""

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = np.asarray(d[key])[None]
        return d


@dataclass
class Stats:
    """Training statistics: intensity mean/std (HU) and biomarker means/stds (fitted on the training part)."""

    mean: float
    std: float
    biomarker_mean: np.ndarray
    biomarker_std: np.ndarray

    def as_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "biomarkers": list(BIOMARKERS),
                "biomarker_mean": self.biomarker_mean.tolist(), "biomarker_std": self.biomarker_std.tolist()}


def fit_stats(table: pd.DataFrame, root: Path) -> Stats:
    """Mean/std of all voxels of the training crops and of the eight biomarkers of the training rows."""
    total, total_sq, count = 0.0, 0.0, 0
    for rel in table["crop_path"]:
        with np.load(root / rel, allow_pickle=False) as crop:
            img = crop["image"].astype(np.float64)
        total += float(img.sum())
        total_sq += float((img**2).sum())
        count += img.size
    mean = total / max(count, 1)
    std = float(np.sqrt(max(total_sq / max(count, 1) - mean**2, 1e-12)))
    bio = table[list(BIOMARKERS)].to_numpy(dtype=np.float64)
    bstd = bio.std(axis=0)
    return Stats(mean, std, bio.mean(axis=0), np.where(bstd > 0, bstd, 1.0))


def rotations(rotation: str, rotate_prob: float, dims: int) -> list[MapTransform]:
    """The training rotations of ``image`` and ``mask`` (:data:`ROTATIONS`) in the axial plane: the last two
    of ``dims`` spatial axes (the rotation about the first axis of a ``[z, y, x]`` volume)."""
    if rotation not in ROTATIONS:
        raise ValueError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")
    keys, plane = ("image", "mask"), (dims - 2, dims - 1)
    if rotation == "quarter":
        return [RandRotate90d(keys, prob=rotate_prob, max_k=3, spatial_axes=plane)]
    angle = {"range_x": np.pi} if dims == 2 else {"range_x": np.pi, "range_y": 0.0, "range_z": 0.0}
    return [RandRotated(keys, prob=rotate_prob, mode=("bilinear", "nearest"), padding_mode="border",
                        keep_size=True, **angle),
            RandFlipd(keys, prob=0.5 if rotate_prob > 0 else 0.0, spatial_axis=dims - 1)]


def transforms(stats: Stats, view: str = "axial", train: bool = False, root: str | Path | None = None,
               rotate_prob: float = 0.75, size: int = IMAGE_SIZE, rotation: str = "quarter") -> Compose:
    """Crop file -> ``image`` [3, size, size] float32, z-scored with ``stats``; ``view="3d"``: [1, size, size, size].
    ``rotation``: the training rotations (:data:`ROTATIONS`)."""
    if view == VOLUME:
        return volume_transforms(stats, train=train, root=root, rotate_prob=rotate_prob, size=size,
                                 rotation=rotation)
    steps = [
        LoadCropd("image", root=root),
        SliceViewd(("image", "mask"), view=view, random_range=TRAIN_SLICES if train else None),
        ModelInputd("image", stats, size),
        Resized("mask", spatial_size=(size, size), mode="nearest"),
    ]
    if train:
        steps += rotations(rotation, rotate_prob, dims=2)
    steps.append(ToTensord(("image", "mask"), track_meta=False))
    return Compose(steps)


def volume_transforms(stats: Stats, train: bool = False, root: str | Path | None = None, rotate_prob: float = 0.75,
                      size: int = 32, rotation: str = "quarter") -> Compose:
    """Crop file -> ``image`` [1, size, size, size] float32 (``[1, z, y, x]``), z-scored with ``stats``."""
    steps = [LoadCropd("image", root=root), VolumeInputd("image", stats, size), AddChanneld("mask")]
    if size != CROP_SIZE:
        steps.append(Resized("mask", spatial_size=(size,) * 3, mode="nearest"))
    if train:
        steps += rotations(rotation, rotate_prob, dims=3)
    steps.append(ToTensord(("image", "mask"), track_meta=False))
    return Compose(steps)


def _records(table: pd.DataFrame, stats: Stats, task: str) -> list[dict[str, Any]]:
    bio = (table[list(BIOMARKERS)].to_numpy(dtype=np.float64) - stats.biomarker_mean) / stats.biomarker_std
    out = []
    for (_, row), b in zip(table.iterrows(), bio, strict=True):
        rec = {"image": row["crop_path"], "nodule_id": row["nodule_id"],
               "label": torch.tensor(float(row["label"])), "biomarkers": torch.tensor(b, dtype=torch.float32)}
        rec["target"] = rec["label"] if task == "classification" else rec["biomarkers"]
        out.append(rec)
    return out


def checkpoint_dataset(data_dir: str | Path, nodule_ids: list[str], input_stats: dict[str, Any],
                       task: str = "classification", target_stats: dict[str, Any] | None = None) -> Dataset:
    """The evaluation inputs of ``nodule_ids`` (from a preprocess / phantoms folder) for a trained model:
    normalised with the statistics its checkpoint recorded (``meta["input_stats"]``, ``meta["target_stats"]``),
    not with statistics refitted on whatever data is at hand. Items keep the order of ``nodule_ids``."""
    root = Path(data_dir)
    nodules = pd.read_csv(root / "nodules.csv")
    check_crop_paths(nodules, root)
    missing = sorted(set(nodule_ids) - set(nodules["nodule_id"]))
    if missing:
        raise ValueError(f"{root / 'nodules.csv'}: no crops for {', '.join(missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    table = nodules.set_index("nodule_id").loc[list(nodule_ids)].reset_index()
    if target_stats:
        bio_mean, bio_std = np.asarray(target_stats["mean"], float), np.asarray(target_stats["std"], float)
    else:
        bio_mean, bio_std = np.zeros(len(BIOMARKERS)), np.ones(len(BIOMARKERS))
    stats = Stats(float(input_stats["mean"]), float(input_stats["std"]), bio_mean, bio_std)
    tf = transforms(stats, view=input_stats.get("view", "axial"), train=False, root=root,
                    size=int(input_stats.get("image_size", IMAGE_SIZE)))
    return Dataset(_records(table, stats, task), transform=tf)


def _variants_of(root: Path, part: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``root/variants.csv`` whose parent is a nodule of ``part``."""
    path = root / "variants.csv"
    if not path.exists():
        raise LidcError(f"{root}: data.variants is set but there is no variants.csv; render the phantoms with "
                        f"training variants: lidc-cdam phantoms --out {root} --all --variants 2")
    table = pd.read_csv(path)
    check_crop_paths(table, root, "variants.csv")
    return table[table["parent_id"].isin(set(part["nodule_id"]))].reset_index(drop=True)


def lidc_datasets(data_dir: str | Path, fold: int = 0, view: str = "axial", task: str = "classification",
                  folds: str | Path | pd.DataFrame | None = None, val_fold: int | None = None,
                  seed: int = 0, rotate_prob: float = 0.75, size: int = IMAGE_SIZE,
                  variants: bool = False, rotation: str = "quarter") -> dict[str, Any]:
    """``{"train", "val", "test"}`` MONAI datasets (+ ``"stats"``, ``"tables"``) for one fold.

    ``data_dir``: an output folder of ``lidc-cdam preprocess`` or ``lidc-cdam phantoms``; ``folds``: a folds
    table (default: the committed ``data_manifest/lidc_folds.csv``); test = ``fold``, val = ``val_fold``
    (default the next fold; -1 for none), train = the rest. Statistics come from the training part only.
    ``size``: the model's input size (224 for the paper's backbones). ``variants``: the training dataset also
    holds the phantom training variants of its nodules (``variants.csv`` of ``lidc-cdam phantoms --variants K``,
    ``tables["train_variants"]``); ``tables["train"]`` stays the nodules themselves, and validation and test
    never see a variant. ``rotation``: the training rotations (:data:`ROTATIONS`). ``"test_variants"``
    (dataset and table) are the test nodules' variants, scored apart:
    their ratings are drawn on their own, so only a model that reads each cause predicts them.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    root = Path(data_dir)
    nodules = pd.read_csv(root / "nodules.csv")
    check_crop_paths(nodules, root)
    fold_table = folds if isinstance(folds, pd.DataFrame) else read_folds(*(() if folds is None else (folds,)))
    table = nodules.merge(fold_table[["nodule_id", "fold"]], on="nodule_id", how="inner", validate="one_to_one")
    n = int(fold_table["fold"].max()) + 1
    val_fold = (fold + 1) % n if val_fold is None else val_fold
    parts = {"test": table[table["fold"] == fold], "val": table[table["fold"] == val_fold],
             "train": table[~table["fold"].isin([fold, val_fold])]}
    if parts["train"].empty:
        raise ValueError(f"fold {fold}: no training nodules in {root}")
    rows = dict(parts)
    if variants:
        rows["train"] = pd.concat([parts["train"], _variants_of(root, parts["train"])], ignore_index=True)
        rows["test_variants"] = _variants_of(root, parts["test"])
        parts = {**parts, "train_variants": rows["train"].iloc[len(parts["train"]):],
                 "test_variants": rows["test_variants"]}
    stats = fit_stats(rows["train"], root)
    out: dict[str, Any] = {"stats": stats, "tables": parts}
    for name in rows:
        part, train = rows[name], name == "train"
        tf = transforms(stats, view=view, train=train, root=root, rotate_prob=rotate_prob, size=size,
                        rotation=rotation)
        if train:
            tf.set_random_state(seed=seed)
        # the loaded crops are cached (a crop is ~0.25 MB as float32): the random slice and rotation still run
        # per item, but no epoch reads the files again (half of a tiny model's epoch was file loading)
        out[name] = CacheDataset(_records(part.reset_index(drop=True), stats, task), transform=tf, progress=False)
    return out
