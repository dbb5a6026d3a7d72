"""npe2 reader: a CT as a layer - a DICOM series folder (or a patient folder above one, or one of its files,
or a multi-frame file), compressed or not, or a NIfTI, NRRD or MetaImage file (``.nii``, ``.nii.gz``, ``.nrrd``,
``.nhdr``, ``.mha``, ``.mhd``), through
:func:`lidc_cdam.ct.read_ct` (the largest CT series of a folder; MR, localizers, gantry tilt, too few slices
and uneven spacing are refused with a clear message).

The layer holds HU ``[z, y, x]`` with the physical spacing as ``scale`` and the origin as ``translate``
(napari's world coordinates are patient millimetres), the lung window as contrast limits, and the
series' geometry in ``metadata["lidc_cdam"]`` (what the CDAM widget needs to place overlays).

A DICOM Parametric Map (a CDAM written by ``lidc-cdam explain-ct --dicom``, or any float map) opens as an overlay
on its own grid in patient mm (:func:`lidc_cdam.ct.parametric_map.read_parametric_map`): it lands on the CT it
was computed on, in the CDAM colours with symmetric limits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from lidc_cdam.viewer._overlays import META_KEY, cdam_colormap

from lidc_cdam.ct.image_file import is_image_file
from lidc_cdam.ct.parametric_map import is_parametric_map, read_parametric_map
from lidc_cdam.ct.read import read_ct
from lidc_cdam.ct.volume import CTVolume, iter_dicom_folders, window_limits


def ct_layer_data(volume: CTVolume, **extra_meta: Any) -> tuple[Any, dict[str, Any], str]:
    """napari ``LayerData`` of a CT volume (an ``image`` layer on the scan's grid, lung window)."""
    meta = {k: v for k, v in volume.meta.items() if k != "labels"}
    metadata = {META_KEY: {"volume": volume, "kind": "ct", **meta, **extra_meta}}
    kwargs = {"name": volume.name, "colormap": "gray", "contrast_limits": window_limits("lung"),
              "metadata": metadata, **volume.layer_kwargs()}
    return volume.hu, kwargs, "image"


def parametric_map_layer_data(volume: CTVolume) -> tuple[Any, dict[str, Any], str]:
    """napari ``LayerData`` of a Parametric Map read back: an overlay in the CDAM colours, symmetric limits."""
    peak = float(np.abs(volume.hu).max()) if volume.hu.size else 0.0
    peak = peak if peak > 0 else 1.0
    meta = {k: v for k, v in volume.meta.items()}
    kwargs = {"name": f"{volume.name} (DICOM)", "colormap": cdam_colormap(True), "contrast_limits": (-peak, peak),
              "opacity": 0.8, "blending": "translucent", "metadata": {META_KEY: {**meta, "volume": volume}},
              **volume.layer_kwargs()}
    return volume.hu, kwargs, "image"


def read_path(path: str | Path) -> list[tuple[Any, dict[str, Any], str]]:
    """Read a CT (raises CTError with a clear message when there is none, or when it is refused)."""
    return [ct_layer_data(read_ct(path))]


def get_reader(path: str | list[str]):
    """npe2 ``get_reader``: a reader when ``path`` is a NIfTI, NRRD or MetaImage file or is (or is in, or is
    above) a folder of DICOM files."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    if p.is_file() and is_parametric_map(p):
        return lambda _path: [parametric_map_layer_data(read_parametric_map(p))]
    if p.is_file() and is_image_file(p):
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
