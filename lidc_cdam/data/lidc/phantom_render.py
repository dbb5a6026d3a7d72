"""Rendering phantom nodules, one at a time: the scan grid, the lung background, the nodule (see :mod:`.phantoms`).

:mod:`.preprocess` renders each scan's phantoms with these; :mod:`.phantoms` runs :mod:`.preprocess` over the
database and re-exports them. Keeping them here means neither of those two modules imports the other.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from lidc_cdam.data.lidc.crops import CROP, HU_WINDOW, Geometry, _resample, crop_box, mask_image
from lidc_cdam.data.lidc.synthetic_dicom import COLS, ROWS, in_plane_origin

PHANTOM_NOTE = ("PHANTOM: nodule rendered from the LIDC-IDRI annotations' consensus contours into a synthetic "
                "lung background; not CT")


def phantom_geometry(scan: Any) -> Geometry:
    """The scan's grid from the database: 512 x 512 x slices, centred in-plane (no DICOM needed)."""
    zvals = np.asarray(scan.slice_zvals, dtype=float)
    ps = float(scan.pixel_spacing)
    x0, y0 = in_plane_origin(ps)
    dz = float(np.median(np.diff(zvals))) if len(zvals) > 1 else float(scan.slice_thickness)
    return Geometry((ps, ps, dz), (x0, y0, float(zvals[0])), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
                    (len(zvals), ROWS, COLS))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    n = gaussian_filter(rng.normal(size=shape), sigma, mode="wrap")
    return n / (n.std() + 1e-8)


def lung_background(rng: np.random.Generator, size: int = CROP) -> np.ndarray:
    """Parenchyma (~ -850 HU, correlated noise) with 2-4 vessels (+40 HU tubes, partial volume)."""
    bg = -850.0 + 25.0 * _smooth_noise(rng, (size,) * 3, 1.5)
    grid = np.stack(np.meshgrid(*[np.arange(size, dtype=float)] * 3, indexing="ij"), axis=-1)
    for _ in range(int(rng.integers(2, 5))):
        point = rng.uniform(0, size, 3)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        radius = rng.uniform(0.7, 1.8)
        rel = grid - point
        dist = np.linalg.norm(rel - (rel @ direction)[..., None] * direction, axis=-1)
        weight = np.clip(radius + 0.5 - dist, 0.0, 1.0)
        bg = bg * (1 - weight) + 40.0 * weight
    return bg


def render_phantom(nodule: Any, geom: Geometry, size: int = CROP) -> dict[str, np.ndarray]:
    """The phantom crop of one nodule (:class:`~lidc_cdam.data.lidc.nodules.Nodule`), same fields as a CT crop."""
    from scipy.ndimage import distance_transform_edt

    start, _ = crop_box(geom, nodule.box_centre_ijk, size)
    cbbox_start = np.array([s.start for s in nodule.cbbox])
    soft = _resample(mask_image(geom, nodule.cmask, cbbox_start, dtype=np.float32), geom, start, size,
                     linear=True, default=0.0)
    soft = np.clip(soft.astype(np.float64), 0.0, 1.0)
    mask = soft >= 0.5
    rng = np.random.default_rng(zlib.crc32(nodule.row["nodule_id"].encode()))
    background = lung_background(rng, size)
    texture = float(nodule.row["texture"])
    solid = float(np.interp(texture, [1, 5], [-650.0, 20.0]))
    inside = solid + 40.0 * _smooth_noise(rng, (size,) * 3, 1.0)
    if float(nodule.row["calcification"]) < 5.5 and mask.any():  # 6 = absent; most annotators saw calcium
        depth = distance_transform_edt(mask)
        inside = np.where(depth >= 0.5 * depth.max(), 600.0, inside)
    image = background * (1 - soft) + inside * soft
    image = np.clip(np.rint(image), *HU_WINDOW).astype(np.int16)
    return {"image": image, "mask": mask.astype(np.uint8), "start_resampled": start}
