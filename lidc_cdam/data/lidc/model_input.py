"""The one model-input contract: how a 32^3 crop in HU becomes a model's input (docs/method.md, "Data").

The array forms here are the only definition; the MONAI dict transforms of training
(:mod:`lidc_cdam.data.lidc.datasets`: ``SliceViewd``, ``ModelInputd``, ``VolumeInputd``) wrap them, and the CT
path (:mod:`lidc_cdam.ct.inputs`, :mod:`lidc_cdam.ct.maps`), the cohort and the trust flag call them directly.

2D backbones: a slice of the ``[z, y, x]`` crop along ``view`` (:data:`VIEWS`; the centre, index :data:`CENTRE`,
or a random index in :data:`TRAIN_SLICES` when training), HU clipped to the crops' window (:data:`HU_WINDOW`, or
``input_stats["hu_clip"]``), repeated to 3 channels, resized bilinearly to the model's size, ``(HU - mean) / std``
with the training crops' statistics (``meta["input_stats"]``). 3D backbones (view :data:`VOLUME`): the whole crop
``[1, z, y, x]``, resized trilinearly when the model's size is not 32, z-scored the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lidc_cdam.data.lidc.crops import HU_WINDOW

VIEWS = {"axial": 0, "coronal": 1, "sagittal": 2}
VOLUME = "3d"  # a 3D backbone's view: the whole crop, no 2.5D stack
CROP_SIZE = 32
CENTRE = 16
TRAIN_SLICES = (14, 18)  # inclusive: the slice jitter of training
IMAGE_SIZE = 224

__all__ = ["CENTRE", "CROP_SIZE", "HU_WINDOW", "IMAGE_SIZE", "TRAIN_SLICES", "VIEWS", "VOLUME", "clip_hu",
           "model_inputs", "plane_input", "slice_plane", "volume_input", "zscore"]


def slice_plane(volume: np.ndarray, view: str, index: int) -> np.ndarray:
    """Slice ``index`` of a ``[z, y, x]`` crop along ``view`` (``[..., z, y, x]``: the last three axes)."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {list(VIEWS)}, got {view!r}")
    volume = np.asarray(volume)
    return np.take(volume, index, axis=volume.ndim - 3 + VIEWS[view])


def clip_hu(crop_hu: np.ndarray, stats: dict[str, Any] | None = None) -> np.ndarray:
    """float32 HU clipped to ``stats["hu_clip"]`` (default :data:`HU_WINDOW`, the crops' own window)."""
    lo, hi = (stats or {}).get("hu_clip") or HU_WINDOW
    return np.clip(np.asarray(crop_hu, dtype=np.float32), lo, hi)


def zscore(x: torch.Tensor, stats: dict[str, Any]) -> torch.Tensor:
    """``(HU - mean) / std`` with the training crops' statistics."""
    return (x - float(stats["mean"])) / float(stats["std"])


def plane_input(planes: np.ndarray | torch.Tensor, stats: dict[str, Any], size: int) -> torch.Tensor:
    """HU planes ``[n, 1, h, w]`` (already sliced and clipped) -> ``[n, 3, size, size]`` float32: 3 channels,
    bilinear resize (``align_corners=False``) when ``h, w`` are not ``size``, z-scored."""
    x = torch.as_tensor(planes, dtype=torch.float32).repeat(1, 3, 1, 1)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return zscore(x, stats)


def model_inputs(crop_hu: np.ndarray, view: str, indices: Sequence[int], stats: dict[str, Any],
                 size: int) -> torch.Tensor:
    """``[len(indices), 3, size, size]`` float32: each slice of the crop along ``view``, as training builds it."""
    vol = clip_hu(crop_hu, stats)
    planes = np.stack([slice_plane(vol, view, int(i)) for i in indices])[:, None]
    return plane_input(np.ascontiguousarray(planes), stats, size)


def volume_input(crop_hu: np.ndarray, stats: dict[str, Any], size: int) -> torch.Tensor:
    """``[1, 1, size, size, size]`` float32: the whole crop ``[z, y, x]`` as a 3D backbone's input (trilinear
    resize when ``size`` is not 32), HU clipped, z-scored."""
    x = torch.from_numpy(clip_hu(crop_hu, stats))[None, None]
    if tuple(x.shape[-3:]) != (size,) * 3:
        x = F.interpolate(x, size=(size,) * 3, mode="trilinear", align_corners=False)
    return zscore(x, stats)
