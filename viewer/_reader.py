"""npe2 reader: a CT as a layer - a DICOM series folder (or a patient folder above one, or one of its files,
or a multi-frame file), compressed or not, or a NIfTI file (``.nii``, ``.nii.gz``), through
:func:`lidc_cdam.ct.read_ct` (the largest CT series of a folder; MR, localizers, gantry tilt, too few slices
and uneven spacing are refused with a clear message).

The layer holds HU ``[z, y, x]`` with the physical spacing as ``scale`` and the origin as ``translate``
(napari's world coordinates are patient millimetres), the lung window as contrast limits, and the
series' geometry in ``metadata["lidc_cdam"]`` (what the CDAM widget needs to place overlays).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lidc_cdam.ct.nifti import is_nifti
from lidc_cdam.ct.read import read_ct
from lidc_cdam.ct.volume import CTVolume, iter_dicom_folders, window_limits

META_KEY = "lidc_cdam"


def ct_layer_data(volume: CTVolume, **extra_meta: Any) -> tuple[Any, dict[str, Any], str]:
    """napari ``LayerData`` of a CT volume (an ``image`` layer on the scan's grid, lung window)."""
    meta = {k: v for k, v in volume.meta.items() if k != "labels"}
    metadata = {META_KEY: {"volume": volume, "kind": "ct", **meta, **extra_meta}}
    kwargs = {"name": volume.name, "colormap": "gray", "contrast_limits": window_limits("lung"),
              "metadata": metadata, **volume.layer_kwargs()}
    return volume.hu, kwargs, "image"


def read_path(path: str | Path) -> list[tuple[Any, dict[str, Any], str]]:
    """Read a CT (raises CTError with a clear message when there is none, or when it is refused)."""
    return [ct_layer_data(read_ct(path))]


def get_reader(path: str | list[str]):
    """npe2 ``get_reader``: a reader when ``path`` is a NIfTI file or is (or is in, or is above) a folder of
    DICOM files."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    if p.is_file() and is_nifti(p):
        return lambda _path: read_path(p)
    if p.is_file() and not (p.suffix.lower() == ".dcm" or _dicom_header(p)):
        return None
    if next(iter_dicom_folders(p), None) is None:
        return None
    return lambda _path: read_path(p)


def _dicom_header(p: Path) -> bool:
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:] == b"DICM"
