"""A NIfTI CT (``.nii``, ``.nii.gz``) as a :class:`CTVolume` in DICOM LPS patient mm.

NIfTI's sform / qform map voxels to RAS mm (x increasing to the patient's right, y to the anterior);
DICOM's LPS is ``(-x, -y, z)`` of that. SimpleITK's reader does the conversion (it negates the first two
rows of the affine), so its origin, spacing and direction are already in the frame DICOM and
:class:`CTVolume` use (checked in ``tests/test_ct_reading.py`` against a hand-written header). Values are
taken as HU after the header's ``scl_slope`` / ``scl_inter`` (SimpleITK applies them), rounded to int16.
Refused: not 3D (a 4D series with more than one volume, a 2D image), several components, fewer than
``MIN_SLICES`` slices; a warning when the values do not look like HU (no value below -200).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lidc_cdam.ct.dicom_reader import MIN_SLICES
from lidc_cdam.ct.errors import CTError, SeriesRefused
from lidc_cdam.ct.volume import CTVolume

SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(SUFFIXES)


def read_nifti(path: str | Path) -> CTVolume:
    """A NIfTI file as a :class:`CTVolume` (see the module docstring)."""
    import SimpleITK as sitk

    path = Path(path).expanduser()
    if not path.is_file():
        raise CTError(f"{path}: no such file")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise SeriesRefused(path, "undecodable", f"cannot be read as NIfTI ({str(err).strip()[:300]})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise SeriesRefused(path, "not_3d", f"{image.GetNumberOfComponentsPerPixel()} components per voxel, not a "
                            "grey-level CT")
    if image.GetDimension() == 4:
        size = image.GetSize()
        if size[3] != 1:
            raise SeriesRefused(path, "not_3d", f"a 4D image of {size[3]} volumes, not one CT volume")
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise SeriesRefused(path, "not_3d", f"a {image.GetDimension()}D image, not a CT volume")
    size = image.GetSize()  # (x, y, z)
    if size[2] < MIN_SLICES:
        raise SeriesRefused(path, "too_few_slices", f"{size[2]} slice(s); at least {MIN_SLICES} are needed for a "
                            "CT volume")
    values = sitk.GetArrayFromImage(image)
    if values.dtype != np.int16:
        values = np.clip(np.rint(values.astype(np.float64)), -32768, 32767).astype(np.int16)
    warnings = []
    if values.size and int(values.min()) > -200:
        warnings.append(f"no value below -200 (range {int(values.min())} .. {int(values.max())}): these may not "
                        "be Hounsfield units")
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    if not all(np.isclose(np.abs(col), 1.0, atol=1e-3).any() for col in direction.T):
        warnings.append("oblique orientation: the grid is rotated in patient space (the models were trained on "
                        "axial LIDC-IDRI scans)")
    name = path.name[: -len(".nii.gz")] if path.name.lower().endswith(".nii.gz") else path.stem
    meta = {"source": str(path), "folder": str(path.parent), "modality": "CT", "format": "NIfTI",
            "warnings": warnings}
    if warnings:
        meta["warning"] = "; ".join(warnings)
    return CTVolume(values, tuple(float(s) for s in image.GetSpacing()), tuple(float(o) for o in image.GetOrigin()),
                    tuple(float(d) for d in direction.ravel()), name=f"CT {name}", meta=meta)
