"""Any CT in: one entry point for a DICOM series folder, a DICOM file, or a NIfTI, NRRD or MetaImage file.

- :func:`read_ct` ``(path, series=None)``: a ``.nii`` / ``.nii.gz``, ``.nrrd`` / ``.nhdr`` or ``.mha`` /
  ``.mhd`` file through :mod:`.image_file`; a
  multi-frame DICOM file as that one volume; a single-frame DICOM file as the series it belongs to (in its
  folder); a folder as one of its series (:func:`lidc_cdam.ct.series.choose_series`: ``series`` is a
  SeriesInstanceUID or an index of :func:`list_series`, by default the largest CT series), read and checked
  by :mod:`.dicom_reader`;
- :func:`list_series` ``(folder)``: the series found, with UID, modality, description, slices and size.

Every refusal is a :class:`~lidc_cdam.ct.errors.CTError` whose message names the folder or file and the
problem (:class:`~lidc_cdam.ct.errors.SeriesRefused` with a ``reason`` code for a series that is read but
refused); a file of none of these formats is refused naming the formats read. Every volume has
``meta["warnings"]`` (a list) and :attr:`CTVolume.invalid` (NaN / inf voxels of the source, or ``None``).
"""

from __future__ import annotations

from pathlib import Path

from lidc_cdam.ct.dicom_reader import read_series
from lidc_cdam.ct.errors import CTError
from lidc_cdam.ct.image_file import FORMATS_TEXT, is_image_file, read_image_file
from lidc_cdam.ct.series import SeriesInfo, choose_series, list_series, read_header, series_of
from lidc_cdam.ct.volume import CTVolume

__all__ = ["list_series", "read_ct"]


def read_ct(path: str | Path, series: str | int | None = None) -> CTVolume:
    """A CT scan as a :class:`CTVolume` (HU, spacing, origin, direction in DICOM LPS mm); see the module."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CTError(f"{path}: no such file or folder")
    if path.is_file() and is_image_file(path):
        return read_image_file(path)
    if path.is_file():
        ds = read_header(path)
        if ds is None:
            raise CTError(f"{path}: neither a DICOM image nor an image file of the formats read here "
                          f"({FORMATS_TEXT})")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            return read_series(series_of([(path, ds)])[0], where=path)
        found = list_series(path.parent)
        uid = str(ds.SeriesInstanceUID).strip()
        info = next((s for s in found if s.uid == uid), None)
        if info is None:
            raise CTError(f"{path}: its series {uid} is not found in {path.parent}")
        return read_series(info, where=path.parent)
    found: list[SeriesInfo] = list_series(path)
    return read_series(choose_series(found, series, where=path), where=path)
