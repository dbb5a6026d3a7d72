"""Explain at a point of any CT: the 32 mm crop at 1 mm around a point, its predictions and maps on the scan.

A point is given in patient millimetres, DICOM LPS ``(x, y, z)``, or as a voxel index ``(i, j, k)``: the
index along the scan's x (column), y (row) and z (slice) axes, ITK / NIfTI / 3D Slicer order, so
``volume.hu[k, j, i]`` is the voxel (continuous values are allowed). The crop is cut as
``lidc-cdam preprocess`` cuts a nodule's (:mod:`lidc_cdam.data.lidc.crops`: the same 1 mm grid of the scan,
the same SimpleITK resampling, HU clipped to [-1000, 400]), centred on the point instead of a consensus box
centre: the box is snapped to the scan's 1 mm patient grid (LPS axes, whatever the file's voxel order), so a
point at a nodule's crop centre gives that nodule's crop exactly, and the same anatomy stored in another voxel
order gives the same crop. Where the box crosses the volume's edge the crop is padded with -1000 HU and the
padded share is reported; a point outside the volume is refused (:class:`PointOutside`, naming the point and
the extent, and saying so when the point's RAS mirror lies inside), and so is a crop that reads NaN or infinite
source voxels (:class:`InvalidVoxels`, with their count).

- :func:`to_world` - a point (mm or voxel index) in patient mm, checked to lie in the volume;
- :func:`volume_extent` - the volume's extent in patient mm (the voxels' outer faces);
- :func:`crop_at_point` - a :class:`PointCrop`: the crop record (as the nodule crops' ``.npz``, with an empty
  mask) and the padded voxels;
- :func:`explain_point` - predictions and maps of one or several checkpoints at a point
  (:func:`lidc_cdam.ct.ensemble.explain_crop` per task), each map placed on the scan's grid on demand;
  :func:`explain_point_steps` the same as a generator of progress steps (for a viewer: progress, cancel).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lidc_cdam.ct.crop import CROP
from lidc_cdam.ct.ensemble import explain_tasks_steps
from lidc_cdam.ct.errors import CTError
from lidc_cdam.ct.maps import drain
from lidc_cdam.ct.placement import crop_box_on_scan, place_on_scan
from lidc_cdam.ct.volume import CTVolume
from lidc_cdam.data.lidc.crops import box_at, crop_hu, crop_record, ct_image

PAD_HU = -1000


class PointOutside(CTError):
    """A point outside the volume: the message names the point and the volume's extent."""

    def __init__(self, message: str, point: Sequence[float]):
        super().__init__(message)
        self.point = tuple(float(v) for v in point)


@dataclass
class PointCrop:
    """The crop at a point: ``crop`` is a record as :func:`lidc_cdam.data.lidc.crops.crop_record` writes per
    nodule (``image`` int16 HU ``[z, y, x]``, ``mask`` all zero, ``crop_to_world``...), ``padded`` the crop
    voxels outside the volume (filled with -1000 HU)."""

    point_world: np.ndarray  # (x, y, z) patient mm
    point_index: np.ndarray  # (i, j, k) continuous voxel index (x, y, z axes)
    crop: dict[str, Any]
    padded: np.ndarray  # bool [32, 32, 32]
    warnings: list[str] = field(default_factory=list)  # about this crop (e.g. an oblique scan resampled)

    @property
    def padded_share(self) -> float:
        """Share of the crop's voxels outside the volume (0 for a box inside, 1 at most)."""
        return float(self.padded.mean())

    @property
    def image(self) -> np.ndarray:
        return self.crop["image"]


def volume_extent(volume: CTVolume) -> tuple[np.ndarray, np.ndarray]:
    """``(low, high)`` patient mm (x, y, z) of the volume: the bounding box of its voxels' outer faces."""
    n = np.array(volume.shape, dtype=float)  # z, y, x
    corners = np.array([[a, b, c] for a in (-0.5, n[0] - 0.5) for b in (-0.5, n[1] - 0.5) for c in (-0.5, n[2] - 0.5)])
    world = volume.index_to_world(corners)
    return world.min(0), world.max(0)


def _inside(volume: CTVolume, world_xyz: np.ndarray) -> np.ndarray:
    """Whether points (patient mm ``[..., 3]``) fall in a voxel of the volume (continuous index within
    [-0.5, n - 0.5] on every axis, as SimpleITK's resampling reads it)."""
    idx = volume.world_to_index(world_xyz)
    n = np.array(volume.shape, dtype=float)
    return ((idx >= -0.5 - 1e-6) & (idx <= n - 0.5 + 1e-6)).all(-1)


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.1f}" for v in values) + ")"


def to_world(volume: CTVolume, point: Sequence[float], ijk: bool = False) -> np.ndarray:
    """A point as patient mm (x, y, z): ``point`` is (x, y, z) mm, or with ``ijk`` a voxel index (i, j, k)
    along x, y, z; :class:`PointOutside` (naming the point and the volume's extent) when it is not in the
    volume."""
    p = np.asarray(point, dtype=float).ravel()
    if p.shape != (3,) or not np.isfinite(p).all():
        raise CTError(f"a point needs three finite numbers ({'i, j, k' if ijk else 'x, y, z'}), got {list(point)}")
    world = volume.index_to_world(p[::-1]) if ijk else p
    if not _inside(volume, world):
        lo, hi = volume_extent(volume)
        z, y, x = volume.shape
        what = f"voxel index (i, j, k) = {_fmt(p)}" if ijk else f"point (x, y, z) = {_fmt(p)} mm (LPS)"
        mirror = world * np.array([-1.0, -1.0, 1.0])
        hint = (f"; its RAS mirror (-x, -y, z) = {_fmt(mirror)} mm lies inside: was it given in RAS (NIfTI, "
                "3D Slicer) coordinates? Points are DICOM LPS: negate x and y"
                if not ijk and _inside(volume, mirror) else "")
        raise PointOutside(
            f"{what} is outside the volume {volume.name!r}: it spans x {lo[0]:.1f} .. {hi[0]:.1f}, "
            f"y {lo[1]:.1f} .. {hi[1]:.1f}, z {lo[2]:.1f} .. {hi[2]:.1f} mm (LPS), voxel index i 0 .. {x - 1}, "
            f"j 0 .. {y - 1}, k 0 .. {z - 1}{hint}", p)
    return world


class InvalidVoxels(CTError):
    """NaN or infinite source voxels inside a point's crop: refused (the message says how many)."""


def _check_invalid(volume: CTVolume, record: dict[str, Any], where: str) -> None:
    """Refuse a crop whose interpolation reads NaN or infinite source voxels (``volume.invalid``): the voxels of
    the scan within one voxel of the crop's box."""
    invalid = getattr(volume, "invalid", None)
    if invalid is None:
        return
    start, stop = crop_box_on_scan(record, volume, pad=1)
    if (stop <= start).any():
        return
    count = int(np.count_nonzero(invalid[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]]))
    if count:
        raise InvalidVoxels(f"{where}: {count} voxel(s) of {volume.name!r} inside the {CROP} mm crop are NaN or "
                            "infinite in the source file: refused (no value can be trusted there)")


def crop_at_point(volume: CTVolume, point: Sequence[float], ijk: bool = False, image: Any = None,
                  point_id: str = "point") -> PointCrop:
    """The 32 mm crop at 1 mm centred on ``point`` (see the module docstring); ``image`` is the scan as a
    SimpleITK float image (:func:`lidc_cdam.data.lidc.crops.ct_image`), made here when not given (pass it
    when cropping several points of one scan)."""
    world = to_world(volume, point, ijk)
    geom = volume.geometry()
    if image is None:
        image = ct_image(volume.hu, geom)
    start, _ = box_at(geom, world, CROP)
    hu = crop_hu(image, geom, start, CROP)
    index_xyz = volume.world_to_index(world)[::-1]
    centre_ijk = np.array([index_xyz[1], index_xyz[0], index_xyz[2]])  # pylidc's (row, column, slice)
    record = crop_record({"image": hu, "mask": np.zeros_like(hu, dtype=np.uint8), "start_resampled": start},
                         geom, point_id, centre_ijk, "point", f"crop at {_fmt(world)} mm (LPS)")
    grid = np.stack(np.meshgrid(*(np.arange(CROP, dtype=float),) * 3, indexing="ij"), -1).reshape(-1, 3)
    crop_world = grid @ record["crop_to_world"][:3, :3].T + record["crop_to_world"][:3, 3]
    padded = ~_inside(volume, crop_world).reshape(CROP, CROP, CROP)
    hu[padded] = PAD_HU  # SimpleITK already wrote -1000 there; explicit for any voxel on the boundary
    _check_invalid(volume, record, point_id)
    warnings = []
    if geom.oblique:
        warnings.append("oblique scan: the crop is resampled onto the patient's axes (LPS), not the file's")
    return PointCrop(world, index_xyz, record, padded, warnings)


@dataclass
class PointResult:
    """What :func:`explain_point` gives: the crop and one :class:`~lidc_cdam.ct.ensemble.EnsembleResult` per
    task (the checkpoints grouped by their outputs)."""

    crop: PointCrop
    ensembles: list[Any]  # EnsembleResult

    def on_scan(self, crop_map: np.ndarray, volume: CTVolume) -> np.ndarray:
        """A ``[32, 32, 32]`` crop-grid array placed on the scan's grid
        (:func:`~lidc_cdam.ct.placement.place_on_scan`)."""
        return place_on_scan(crop_map, self.crop.crop, volume)


def explain_point_steps(volume: CTVolume, point: Sequence[float], checkpoints: Sequence[Any], ijk: bool = False,
                        method: str = "cdam", view: str | None = None, slices: str = "all", margin: int = 3,
                        options: dict[str, Any] | None = None, image: Any = None, point_id: str = "point",
                        batch: int = 8, targets: Sequence[str] | None = None, cache: Any = None,
                        concepts: Callable[[Any], list] | None = None) -> Generator[tuple[int, int], None, PointResult]:
    """:func:`explain_point` as a generator: yields ``(steps done, steps in all)`` after each batch of slices of
    each checkpoint (a viewer's worker reports them and can stop between them); returns the result.
    ``targets`` limits each task to those of its outputs (a task with none of them is skipped); ``cache``
    (a :class:`~lidc_cdam.ct.cache.MapCache`) keeps the maps of each checkpoint and crop; ``concepts(model)`` gives
    a model its concept targets (:func:`lidc_cdam.ct.ensemble.explain_tasks_steps`)."""
    crop = crop_at_point(volume, point, ijk, image, point_id)
    ensembles = yield from explain_tasks_steps(checkpoints, crop.crop, targets, method=method, view=view,
                                               slices=slices, margin=margin, options=options, batch=batch,
                                               where=point_id, cache=cache, concepts=concepts)
    return PointResult(crop, ensembles)


def explain_point(volume: CTVolume, point: Sequence[float], checkpoints: Sequence[Any], ijk: bool = False,
                  method: str = "cdam", view: str | None = None, slices: str = "all", margin: int = 3,
                  options: dict[str, Any] | None = None, image: Any = None, point_id: str = "point",
                  progress: Callable[[int, int], None] | None = None, **kwargs: Any) -> PointResult:
    """Predictions and maps at a point: the crop (:func:`crop_at_point`), then for each task's checkpoints
    (paths or :class:`~lidc_cdam.ct.checkpoint.LoadedModel`, grouped by
    :func:`~lidc_cdam.ct.ensemble.group_checkpoints`) the ensemble of their predictions and maps of every
    target (:func:`~lidc_cdam.ct.ensemble.explain_crop_steps`).
    ``slices`` is ``"all"`` (the 32 slices along the view) or ``"nodule"`` (the centre slice +- ``margin``:
    the crop has no mask); ``progress(done, total)`` is called after each batch of slices; ``kwargs`` go to
    :func:`explain_point_steps` (``batch``, ``targets``, ``cache``)."""
    return drain(explain_point_steps(volume, point, checkpoints, ijk, method, view, slices, margin, options, image,
                                     point_id, **kwargs), progress)
