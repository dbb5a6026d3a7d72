"""Rendering phantom nodules, one at a time: the scan grid, the lung background, the nodule (see :mod:`.phantoms`).

:mod:`.preprocess` renders each scan's phantoms with these; :mod:`.phantoms` runs :mod:`.preprocess` over the
database and re-exports them. Keeping them here means neither of those two modules imports the other.
"""

from __future__ import annotations

import zlib
from dataclasses import replace
from functools import lru_cache
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from lidc_cdam.data.lidc.crops import CROP, HU_WINDOW, Geometry, _resample, crop_box, mask_image
from lidc_cdam.data.lidc.phantom_causes import CAUSE_REGION, Ratings, render_causes
from lidc_cdam.data.lidc.synthetic_dicom import COLS, ROWS, in_plane_origin

PHANTOM_NOTE = ("PHANTOM: nodule rendered from the LIDC-IDRI annotations' consensus contours and mean ratings "
                "(each biomarker a rendered cause) into a synthetic lung background; not CT")
#: the rendering's default version, the one the shipped models were trained on (caches key on it): 5, render 4
#: with its spikes spaced evenly around the outline, so that they keep the body's axis ratio. 2 rendered every
#: biomarker's cause (:mod:`.phantom_causes`); 3 renders sphericity on every slice; 4 draws render 3's body with
#: its partial volume in a lung without vessels (``lidc-cdam phantoms --render-version N`` chooses one).
RENDER_VERSION = 5


def phantom_geometry(scan: Any) -> Geometry:
    """The scan's grid from the database: 512 x 512 x slices, centred in-plane (no DICOM needed)."""
    zvals = np.asarray(scan.slice_zvals, dtype=float)
    ps = float(scan.pixel_spacing)
    x0, y0 = in_plane_origin(ps)
    dz = float(np.median(np.diff(zvals))) if len(zvals) > 1 else float(scan.slice_thickness)
    return Geometry((ps, ps, dz), (x0, y0, float(zvals[0])), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
                    (len(zvals), ROWS, COLS))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    n = gaussian_filter(rng.normal(size=shape), sigma, mode="wrap")
    return n / (n.std() + 1e-8)


def lung_background(rng: np.random.Generator, size: int = CROP, vessels: bool = True) -> np.ndarray:
    """Parenchyma (~ -850 HU, correlated noise) with 2-4 vessels (+40 HU tubes, partial volume); ``vessels=False``:
    the parenchyma alone (render 4: a vessel is an elongated bright structure that a model trained on a few
    hundred phantoms takes for the nodule's own elongation, see ``docs/method.md``)."""
    bg = -850.0 + 25.0 * _smooth_noise(rng, (size,) * 3, 1.5)
    if not vessels:
        return bg
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


def render_phantom(nodule: Any, geom: Geometry, size: int = CROP, version: int = RENDER_VERSION
                   ) -> dict[str, np.ndarray]:
    """The phantom crop of one nodule (:class:`~lidc_cdam.data.lidc.nodules.Nodule`): the CT crop's fields, the
    mask of the nodule as rendered, and each target's cause region ``cause_<target>`` (:mod:`.phantom_causes`);
    ``version``: the rendering (:func:`~lidc_cdam.data.lidc.phantom_causes.render_causes`)."""
    start, _ = crop_box(geom, nodule.box_centre_ijk, size)
    cbbox_start = np.array([s.start for s in nodule.cbbox])
    soft = _resample(mask_image(geom, nodule.cmask, cbbox_start, dtype=np.float32), geom, start, size,
                     linear=True, default=0.0)
    soft = np.clip(soft.astype(np.float64), 0.0, 1.0)
    rng = np.random.default_rng(zlib.crc32(nodule.row["nodule_id"].encode()))
    background = lung_background(rng, size, vessels=version < 4)
    noise = _smooth_noise(rng, (size,) * 3, 1.0)
    image, mask, regions = render_causes(soft, Ratings.of(nodule.row), background, noise, rng, version)
    image = np.clip(np.rint(image), *HU_WINDOW).astype(np.int16)
    causes = {f"cause_{target}": regions[region].astype(np.uint8) for target, region in CAUSE_REGION.items()}
    return {"image": image, "mask": mask.astype(np.uint8), "start_resampled": start, **causes}


RATED = tuple(Ratings.__dataclass_fields__)


@lru_cache(maxsize=1)
def _rating_pool() -> dict[str, tuple[float, ...]]:
    """The distinct values each mean rating takes over the committed nodule table (the selected nodules)."""
    from lidc_cdam.data.lidc.nodules import read_nodule_table

    table = read_nodule_table()
    return {k: tuple(sorted({round(float(v), 4) for v in table[k]})) for k in RATED}


def variant_ratings(nodule_id: str, k: int) -> dict[str, float]:
    """The mean ratings of variant ``k`` (1, 2, ...) of a nodule: each rating drawn on its own, uniformly over
    the distinct values it takes among the selected nodules (seeded by the id and ``k``). The correlations
    between ratings (sphericity with spiculation, calcification with texture, ...) are broken, and the rare
    ratings (calcified, ground glass, spiculated) are as common as the frequent ones."""
    pool = _rating_pool()
    rng = np.random.default_rng(zlib.crc32(f"{nodule_id}/variant{k}".encode()))
    return {name: pool[name][int(rng.integers(len(pool[name])))] for name in RATED}


def render_variant(nodule: Any, geom: Geometry, k: int, version: int = RENDER_VERSION
                   ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Variant ``k`` of a phantom: the same contour and lung background as :func:`render_phantom`, the causes of
    :func:`variant_ratings` (training data in which every cause varies on its own). Returns the crop and the
    ratings it was rendered with."""
    ratings = variant_ratings(nodule.row["nodule_id"], k)
    return render_phantom(replace(nodule, row={**nodule.row, **ratings}), geom, version=version), ratings
