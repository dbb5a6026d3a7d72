"""1 mm isotropic resampling and the 32 x 32 x 32 crop per nodule, and where it sits in the scan.

Crops are cut from the scan's **patient grid** (:meth:`Geometry.patient_grid`): 1 mm voxels aligned with the
patient, not with the file, i.e. DICOM LPS axes (+x patient left, +y posterior, +z superior, an identity
direction), anchored at the lowest corner (in LPS) of the box of the scan's voxel centres and covering that
box: index ``r`` (x, y, z) is at ``grid_origin + r`` mm. The same anatomy stored in any voxel order (flipped,
permuted, LPS / RAS / LAS NIfTI, DICOM with reversed rows, columns or slices) has the same box, so the same
grid and the same crops to round-off. Standard axial scans (LIDC-IDRI, the phantoms) have an identity
direction: their patient grid is the 1 mm grid at the scan's own origin, as before (their crops do not
change). An oblique scan's grid is its rotated box's bounding box; its crops are resampled onto the patient
axes (see ``docs/method.md``, "Patient axes").

A nodule's crop is the 32^3 block of that grid centred on the centre of the consensus (clevel 0.5) bounding
box; only that block is resampled (SimpleITK: linear for CT, nearest neighbour for the consensus mask), which
gives exactly the values of resampling the whole scan and cropping. Crops that would leave the patient grid
are skipped (``crop_outside_volume``). HU are clipped to [-1000, 400].

One ``.npz`` per nodule (written atomically), arrays in numpy order ``[z, y, x]``:

- ``image`` int16 HU [32, 32, 32]; ``mask`` uint8 consensus mask [32, 32, 32];
- ``spacing`` (x, y, z) = 1 mm, ``origin`` (x, y, z) mm of voxel [0, 0, 0], ``direction`` 3 x 3 (the identity:
  the crop's axes are the patient's);
- ``start_resampled`` (z, y, x) index of voxel [0, 0, 0] in the scan's patient grid, ``resampled_shape``;
- ``crop_to_scan_ijk`` 4 x 4: crop index (z, y, x, 1) -> pylidc's scan voxel index (i row, j column,
  k slice, 1), continuous; ``crop_to_world`` 4 x 4: crop index (z, y, x, 1) -> patient mm (x, y, z, 1);
- ``scan_spacing``, ``scan_origin`` (x, y, z), ``scan_shape`` (z, y, x) of the original series;
- ``centre_ijk`` the box centre in pylidc's scan index; ``nodule_id``, ``source`` ("ct" or "phantom"),
  ``note``, ``hu_window``, ``axes`` ("zyx");
- phantoms only: ``cause_<target>`` uint8 [32, 32, 32], where each biomarker's rendered cause lies
  (:mod:`lidc_cdam.data.lidc.phantom_causes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lidc_cdam.data.lidc.errors import LidcError
from lidc_cdam.io import write_npz

CROP = 32
HU_WINDOW = (-1000, 400)
FORMAT_VERSION = 1


class CropError(LidcError):
    """One nodule cannot be cropped (e.g. its crop would leave the volume): that nodule is skipped."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Geometry:
    """A scan's voxel grid: spacing and origin (x, y, z), direction (3 x 3, columns = index axes),
    and shape in numpy order (z, y, x)."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    shape_zyx: tuple[int, int, int]

    @property
    def dmat(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def ijk_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """pylidc's (i row, j column, k slice) -> patient (x, y, z) mm."""
        ijk = np.asarray(ijk, dtype=float)
        xyz_index = np.array([ijk[1], ijk[0], ijk[2]])
        return np.asarray(self.origin) + self.dmat @ (np.asarray(self.spacing) * xyz_index)

    @property
    def patient_aligned(self) -> bool:
        """Whether the index axes x, y, z run along the patient's +x, +y, +z (an identity direction)."""
        return bool(np.allclose(self.dmat, np.eye(3), atol=1e-6))

    @property
    def oblique(self) -> bool:
        """Whether the grid is rotated in patient space (its direction is not a signed permutation)."""
        return not all(np.isclose(np.abs(col), 1.0, atol=1e-3).any() for col in self.dmat.T)

    def patient_grid(self, spacing: float = 1.0) -> Geometry:
        """The grid crops are cut from (see the module docstring): ``spacing`` mm voxels along the patient's
        LPS axes, origin at the LPS-lowest corner of the box of the voxel centres, covering that box."""
        n = np.array(self.shape_zyx[::-1], dtype=float) - 1.0  # index extent along x, y, z
        if self.patient_aligned:  # the scan's own origin, exactly (standard axial scans: crops as before)
            low = np.asarray(self.origin, dtype=float)
            extent = n * np.asarray(self.spacing)
        else:
            corners = np.array([[a, b, c] for a in (0.0, n[0]) for b in (0.0, n[1]) for c in (0.0, n[2])])
            world = np.asarray(self.origin) + (corners * np.asarray(self.spacing)) @ self.dmat.T
            low, extent = world.min(0), world.max(0) - world.min(0)
        count = np.floor(extent / spacing + 1e-6).astype(int) + 1
        return Geometry((spacing,) * 3, tuple(float(v) for v in low), IDENTITY,
                        (int(count[2]), int(count[1]), int(count[0])))

    def resampled_shape_zyx(self, spacing: float = 1.0) -> tuple[int, int, int]:
        """Shape (z, y, x) of the patient grid at ``spacing`` mm."""
        return self.patient_grid(spacing).shape_zyx


IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def box_at(geom: Geometry, world_xyz: np.ndarray, size: int = CROP) -> tuple[np.ndarray, np.ndarray]:
    """(start index (z, y, x) in the scan's patient grid, centre there (z, y, x)) of the ``size`` box centred
    on a point in patient mm (x, y, z), snapped to the 1 mm grid; no check that it stays inside."""
    grid = geom.patient_grid()
    centre = (np.asarray(world_xyz, dtype=float) - np.asarray(grid.origin))[::-1]  # continuous, 1 mm, LPS axes
    start = np.floor(centre - (size - 1) / 2.0 + 0.5).astype(int)
    return start, centre


def crop_box(geom: Geometry, centre_ijk: np.ndarray, size: int = CROP) -> tuple[np.ndarray, np.ndarray]:
    """(start index (z, y, x) in the patient grid, centre there (z, y, x)); raises CropError if it leaves it."""
    start, centre = box_at(geom, geom.ijk_to_world(centre_ijk), size)
    shape = np.array(geom.resampled_shape_zyx())
    if (start < 0).any() or (start + size > shape).any():
        raise CropError("crop_outside_volume", f"the {size} mm crop centred at scan index (i, j, k) = "
                                               f"{np.round(centre_ijk, 1).tolist()} leaves the volume")
    return start, centre


def _sitk_image(array_zyx: np.ndarray, spacing, origin, direction):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array_zyx)
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    img.SetDirection([float(d) for d in direction])
    return img


def _resample(img, geom: Geometry, start_zyx: np.ndarray, size: int, linear: bool, default: float):
    """The ``size``^3 block of ``geom``'s patient grid at ``start_zyx``, resampled from ``img`` (any direction)."""
    import SimpleITK as sitk

    origin = np.asarray(geom.patient_grid().origin) + start_zyx[::-1].astype(float)
    out = sitk.Resample(img, [size] * 3, sitk.Transform(), sitk.sitkLinear if linear else sitk.sitkNearestNeighbor,
                        origin.tolist(), [1.0, 1.0, 1.0], list(IDENTITY), default, img.GetPixelID())
    return sitk.GetArrayFromImage(out)


def mask_image(geom: Geometry, cmask_ijk: np.ndarray, cbbox_start_ijk: np.ndarray, dtype=np.uint8):
    """pylidc's consensus mask (``[i, j, k]`` inside the box starting at ``cbbox_start_ijk``) as a
    SimpleITK image placed in the scan's geometry."""
    arr = np.ascontiguousarray(np.transpose(cmask_ijk, (2, 0, 1)).astype(dtype))  # -> [k, i, j] = zyx
    origin = geom.ijk_to_world(np.asarray(cbbox_start_ijk, dtype=float))
    return _sitk_image(arr, geom.spacing, origin, geom.direction)


def affines(geom: Geometry, start_zyx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(crop_to_scan_ijk, crop_to_world), both 4 x 4 acting on (z, y, x, 1): a crop of ``geom``'s patient grid
    at ``start_zyx`` to the scan's own voxel index and to patient mm."""
    perm = np.zeros((3, 3))
    perm[0, 2] = perm[1, 1] = perm[2, 0] = 1.0  # (z, y, x) -> (x, y, z)
    to_world = np.eye(4)
    to_world[:3, :3] = perm  # the patient grid's axes are LPS
    to_world[:3, 3] = np.asarray(geom.patient_grid().origin) + start_zyx[::-1].astype(float)
    # world -> scan index (x, y, z) -> pylidc (i = y, j = x, k = z)
    world_to_xyz = np.eye(4)
    world_to_xyz[:3, :3] = np.diag(1.0 / np.asarray(geom.spacing)) @ geom.dmat.T
    world_to_xyz[:3, 3] = -world_to_xyz[:3, :3] @ np.asarray(geom.origin)
    xyz_to_ijk = np.zeros((4, 4))
    xyz_to_ijk[0, 1] = xyz_to_ijk[1, 0] = xyz_to_ijk[2, 2] = xyz_to_ijk[3, 3] = 1.0
    return xyz_to_ijk @ world_to_xyz @ to_world, to_world


def crop_nodule(ct_image, geom: Geometry, cmask_ijk: np.ndarray, cbbox_start_ijk: np.ndarray,
                centre_ijk: np.ndarray, size: int = CROP) -> dict[str, np.ndarray]:
    """Crop + mask for one nodule from the scan's SimpleITK image (float32 HU); raises CropError."""
    start, _ = crop_box(geom, centre_ijk, size)
    image = crop_hu(ct_image, geom, start, size)
    mask = _resample(mask_image(geom, cmask_ijk, cbbox_start_ijk), geom, start, size, linear=False, default=0)
    return {"image": image, "mask": mask.astype(np.uint8), "start_resampled": start}


def crop_hu(ct_image, geom: Geometry, start_zyx: np.ndarray, size: int = CROP) -> np.ndarray:
    """The ``size``^3 block of the 1 mm grid at ``start_zyx`` (linear), HU clipped to ``HU_WINDOW``, int16;
    voxels outside the scan are ``HU_WINDOW[0]`` (-1000, air)."""
    image = _resample(ct_image, geom, np.asarray(start_zyx), size, linear=True, default=float(HU_WINDOW[0]))
    return np.clip(np.rint(image), *HU_WINDOW).astype(np.int16)


def ct_image(hu_zyx: np.ndarray, geom: Geometry):
    return _sitk_image(hu_zyx.astype(np.float32, copy=False), geom.spacing, geom.origin, geom.direction)


def crop_record(crop: dict[str, np.ndarray], geom: Geometry, nodule_id: str, centre_ijk: np.ndarray,
                source: str, note: str) -> dict[str, Any]:
    """The arrays and metadata written per nodule (see the module docstring)."""
    start = np.asarray(crop["start_resampled"], dtype=int)
    to_ijk, to_world = affines(geom, start)
    return {
        "image": crop["image"], "mask": crop["mask"],
        "spacing": np.ones(3), "origin": to_world[:3, 3], "direction": np.eye(3),
        "start_resampled": start, "resampled_shape": np.array(geom.resampled_shape_zyx()),
        "crop_to_scan_ijk": to_ijk, "crop_to_world": to_world,
        "scan_spacing": np.asarray(geom.spacing), "scan_origin": np.asarray(geom.origin),
        "scan_shape": np.asarray(geom.shape_zyx), "centre_ijk": np.asarray(centre_ijk, dtype=float),
        "nodule_id": np.array(nodule_id), "source": np.array(source), "note": np.array(note),
        "hu_window": np.array(HU_WINDOW), "axes": np.array("zyx"), "format_version": np.array(FORMAT_VERSION),
        **{k: v for k, v in crop.items() if k.startswith("cause_")},
    }


def write_crop(path: str | Path, record: dict[str, Any]) -> Path:
    return write_npz(path, **record)


def read_crop(path: str | Path) -> dict[str, Any]:
    """A crop file as a dict (0-d string arrays as ``str``)."""
    with np.load(path, allow_pickle=False) as data:
        out = {k: data[k] for k in data.files}
    for k, v in out.items():
        if v.ndim == 0 and v.dtype.kind == "U":
            out[k] = str(v)
    return out
