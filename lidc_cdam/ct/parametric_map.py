"""A DICOM Parametric Map read back onto its grid: how a CDAM written by ``explain-ct --dicom`` (or any float
Parametric Map on a CT's Frame of Reference) comes back into the viewer.

:func:`is_parametric_map` tells a file by its SOP Class; :func:`read_parametric_map` gives a
:class:`~lidc_cdam.ct.volume.CTVolume` of the real-world values (float32 ``[z, y, x]``) with the map's own
geometry in patient mm, through highdicom's volume of the map, so it lands on the source scan wherever that is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lidc_cdam.ct.errors import CTError
from lidc_cdam.ct.volume import CTVolume

PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"


def is_parametric_map(path: str | Path) -> bool:
    """Whether ``path`` is a DICOM file of the Parametric Map Storage SOP Class (reads the header only)."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:
        return False
    return str(ds.get("SOPClassUID", "")) == PARAMETRIC_MAP_STORAGE


def read_parametric_map(path: str | Path) -> CTVolume:
    """The map of a Parametric Map file as a volume (values after its real-world value mapping, float32) on its own
    grid; :class:`CTError` naming the file when it is not one, or has no regular 3D geometry."""
    import highdicom as hd
    import pydicom
    import SimpleITK as sitk

    path = Path(path).expanduser()
    try:
        ds = pydicom.dcmread(str(path))
    except Exception as err:
        raise CTError(f"{path}: not a readable DICOM file ({err})") from None
    if str(ds.get("SOPClassUID", "")) != PARAMETRIC_MAP_STORAGE:
        raise CTError(f"{path}: not a DICOM Parametric Map (SOP Class {ds.get('SOPClassUID', 'missing')})")
    try:
        volume = hd.pm.ParametricMap.from_dataset(ds).get_volume(apply_real_world_transform=True)
    except (ValueError, RuntimeError, AttributeError) as err:
        raise CTError(f"{path}: the Parametric Map's frames do not form a regular 3D volume ({err})") from None
    image = sitk.DICOMOrient(volume.to_simpleitk(), "LPS")  # axes x, y, z as a CT's where the grid allows
    values = sitk.GetArrayFromImage(image).astype(np.float32)
    description = str(ds.get("ContentDescription", "") or ds.get("SeriesDescription", "") or path.stem)
    meta = {"source": str(path), "format": "DICOM Parametric Map", "kind": "parametric-map",
            "description": description, "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "")),
            "referenced_series": [str(s.SeriesInstanceUID) for s in ds.get("ReferencedSeriesSequence", [])]}
    return CTVolume(values, tuple(float(s) for s in image.GetSpacing()), tuple(float(o) for o in image.GetOrigin()),
                    tuple(float(d) for d in image.GetDirection()), name=description, meta=meta)
