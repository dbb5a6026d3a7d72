"""Model inputs from a crop: each slice along a view exactly as the training transforms build the central one.

:func:`model_inputs` is :func:`lidc_cdam.data.lidc.datasets.transforms` for many slices at once, on an array
in memory: HU clipped (``input_stats["hu_clip"]``, default the crops' window), 3 channels, bilinear resize to
the model's size, ``(HU - mean) / std`` with the checkpoint's ``meta["input_stats"]``. :func:`slices_for`
chooses which slices of a crop are explained (through the nodule +- a margin, or all). A 3D backbone (view
``"3d"``) reads the whole crop instead: :func:`volume_input`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lidc_cdam.data.lidc.crops import HU_WINDOW

#: as in :mod:`lidc_cdam.data.lidc.datasets` (not imported from there: that module pulls MONAI in)
VIEWS = {"axial": 0, "coronal": 1, "sagittal": 2}
VOLUME = "3d"  # a 3D backbone's view: the whole crop, no 2.5D stack
CENTRE = 16


def slice_plane(volume: np.ndarray, view: str, index: int) -> np.ndarray:
    """Slice ``index`` of a ``[z, y, x]`` crop along ``view`` (as ``SliceViewd``)."""
    return np.take(volume, index, axis=VIEWS[view])


def slices_for(mask: np.ndarray, view: str, mode: str = "nodule", margin: int = 3) -> list[int]:
    """Which crop slices to explain: ``"all"`` 32, or ``"nodule"``: where the mask is non-empty +- margin
    (always including the centre)."""
    if mode == "all":
        return list(range(mask.shape[VIEWS[view]]))
    if mode != "nodule":
        raise ValueError(f"slices must be 'nodule' or 'all', got {mode!r}")
    axes = tuple(a for a in range(3) if a != VIEWS[view])
    present = np.flatnonzero(np.asarray(mask).any(axis=axes))
    n = mask.shape[VIEWS[view]]
    lo, hi = (int(present.min()), int(present.max())) if present.size else (CENTRE, CENTRE)
    lo, hi = min(lo, CENTRE), max(hi, CENTRE)
    return list(range(max(0, lo - margin), min(n, hi + margin + 1)))


def volume_input(crop_hu: np.ndarray, stats: dict[str, Any], size: int):
    """``[1, 1, size, size, size]`` float32 tensor: the whole crop as a 3D backbone's training transforms build it
    (:func:`lidc_cdam.data.lidc.datasets.volume_transforms`: ``[1, z, y, x]``, trilinear resize when ``size`` is
    not 32, ``(HU - mean) / std``), HU clipped as the crops are."""
    import torch
    import torch.nn.functional as F

    lo, hi = stats.get("hu_clip") or HU_WINDOW
    x = torch.from_numpy(np.clip(np.asarray(crop_hu, dtype=np.float32), lo, hi))[None, None]
    if tuple(x.shape[-3:]) != (size,) * 3:
        x = F.interpolate(x, size=(size,) * 3, mode="trilinear", align_corners=False)
    return (x - float(stats["mean"])) / float(stats["std"])


def model_inputs(crop_hu: np.ndarray, view: str, indices: Sequence[int], stats: dict[str, Any], size: int):
    """``[len(indices), 3, size, size]`` float32 tensor: each slice as the training transforms build it."""
    import torch
    import torch.nn.functional as F

    lo, hi = stats.get("hu_clip") or HU_WINDOW
    vol = np.clip(np.asarray(crop_hu, dtype=np.float32), lo, hi)
    planes = np.stack([slice_plane(vol, view, int(i)) for i in indices])[:, None]
    x = torch.from_numpy(np.ascontiguousarray(planes)).repeat(1, 3, 1, 1)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - float(stats["mean"])) / float(stats["std"])
