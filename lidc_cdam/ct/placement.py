"""Arrays on a crop's 1 mm grid placed back on the scan's voxel grid (maps, consensus masks).

:func:`place_on_scan` resamples (SimpleITK, linear or nearest) from the crop's grid (``crop_to_world``) to
the scan's grid, zero outside the crop: an array of exactly the CT's shape, shown with the CT's geometry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lidc_cdam.ct.crop import CROP, read_crop
from lidc_cdam.ct.nodules import NoduleRef
from lidc_cdam.ct.volume import CTVolume


def crop_box_on_scan(crop: dict[str, Any], volume: CTVolume, pad: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(start, stop)`` (z, y, x) of the scan voxels the crop covers (+ ``pad``), clipped to the scan."""
    corners = np.array([[a, b, c, 1.0] for a in (0, CROP - 1) for b in (0, CROP - 1) for c in (0, CROP - 1)])
    world = (np.asarray(crop["crop_to_world"], dtype=float) @ corners.T).T[:, :3]
    idx = volume.world_to_index(world)
    start = np.maximum(np.floor(idx.min(0)).astype(int) - pad, 0)
    stop = np.minimum(np.ceil(idx.max(0)).astype(int) + pad + 1, np.array(volume.shape))
    return start, stop


def place_on_scan(crop_map: np.ndarray, crop: dict[str, Any], volume: CTVolume, linear: bool = True,
                  dtype=np.float32) -> np.ndarray:
    """A ``[32, 32, 32]`` array on the crop's 1 mm grid resampled onto ``volume``'s grid (SimpleITK, linear
    or nearest), zero outside the crop: an array of the CT's shape (only the crop's block is touched)."""
    import SimpleITK as sitk

    src = sitk.GetImageFromArray(np.ascontiguousarray(crop_map, dtype=np.float32 if linear else np.uint8))
    to_world = np.asarray(crop["crop_to_world"], dtype=float)
    src.SetOrigin(to_world[:3, 3].tolist())
    src.SetSpacing([float(s) for s in np.asarray(crop.get("spacing", (1.0, 1.0, 1.0)), dtype=float)])
    # columns of crop_to_world act on (z, y, x): the image axes (x, y, z) are its columns 2, 1, 0
    src.SetDirection((to_world[:3, [2, 1, 0]] / np.asarray(src.GetSpacing())).ravel().tolist())
    out = np.zeros(volume.shape, dtype=dtype)
    start, stop = crop_box_on_scan(crop, volume)
    if (stop <= start).any():
        return out
    origin = volume.index_to_world(start.astype(float))
    ref_size = [int(v) for v in (stop - start)[::-1]]
    block = sitk.Resample(src, ref_size, sitk.Transform(), sitk.sitkLinear if linear else sitk.sitkNearestNeighbor,
                          origin.tolist(), [float(s) for s in volume.spacing], [float(d) for d in volume.direction],
                          0.0, src.GetPixelID())
    out[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]] = sitk.GetArrayFromImage(block)
    return out


def nodule_labels(nodules: Sequence[NoduleRef], volume: CTVolume) -> np.ndarray:
    """Labels ``[z, y, x]`` (uint8, nodule k -> k + 1) from the crops' consensus masks on the scan's grid."""
    labels = np.zeros(volume.shape, dtype=np.uint8)
    for n, nod in enumerate(nodules, start=1):
        crop = read_crop(nod.crop_path)
        placed = place_on_scan(crop["mask"].astype(np.uint8), crop, volume, linear=False, dtype=np.uint8)
        labels[placed > 0] = n
    return labels
