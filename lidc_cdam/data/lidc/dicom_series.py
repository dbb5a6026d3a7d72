"""Reading one scan's DICOM series through pylidc, with checks that name precisely what is wrong.

pylidc's ``scan.load_all_dicom_images()`` finds the series folder (``get_path_to_dicom_files``), keeps the
files of this scan's study and series, drops duplicate z positions and sorts by z. On top of that this
module checks, and raises :class:`~lidc_cdam.data.lidc.errors.SeriesError` with a reason code when:

- ``not_found``: pylidc finds no folder for the scan under the DICOM root;
- ``corrupt_file``: a file cannot be parsed or its pixels cannot be decoded (the file is named);
- ``mixed_series``: the series' images disagree in size, pixel spacing or orientation;
- ``unsupported_orientation``: not axial (LIDC-IDRI series are all axial);
- ``missing_slice``: z positions of the database's slice list have no file (the positions are listed);
- ``slice_mismatch``: files at z positions the database does not know (the contours' slice indices
  would be wrong);
- ``uneven_spacing``: gaps between consecutive slices differ by more than ``SPACING_TOLERANCE``.

Files of other series in the same folder, and duplicate z positions, are only reported as warnings
(pylidc ignores them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lidc_cdam.data.lidc.errors import SeriesError

Z_TOLERANCE = 0.01  # mm: a file's z matches a database z position
SPACING_TOLERANCE = 0.05  # relative: |gap - median gap| / median gap
AXIAL = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])


@dataclass
class SeriesVolume:
    """A scan's CT volume in HU, numpy order ``[z, y, x]`` (= pylidc's ``[k, i, j]``), and its geometry."""

    hu: np.ndarray  # int16 [n_slices, rows, cols]
    spacing: tuple[float, float, float]  # (x, y, z) mm: column, row, slice spacing
    origin: tuple[float, float, float]  # (x, y, z) mm of voxel [0, 0, 0]'s centre
    direction: tuple[float, ...]  # 3 x 3 row-major, columns = the x, y, z index axes in patient space
    zvals: np.ndarray  # slice z positions (mm), increasing
    folder: str
    warnings: list[str] = field(default_factory=list)

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape)  # type: ignore[return-value]


def _dcm_files(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.endswith(".dcm") and not f.startswith("."))


def _diagnose_corrupt(folder: str) -> SeriesError | None:
    import pydicom

    for name in _dcm_files(folder):
        try:
            pydicom.dcmread(os.path.join(folder, name))
        except Exception as err:
            return SeriesError("corrupt_file", f"{os.path.join(folder, name)}: cannot be read as DICOM ({err})")
    return None


def series_folder(scan: Any) -> str:
    try:
        return scan.get_path_to_dicom_files()
    except (RuntimeError, OSError) as err:
        raise SeriesError("not_found", f"{scan.patient_id} series {scan.series_instance_uid}: {err}") from err


def load_images(scan: Any) -> tuple[list[Any], str]:
    """pylidc's ``load_all_dicom_images`` with corrupt files named."""
    folder = series_folder(scan)
    try:
        images = scan.load_all_dicom_images(verbose=False)
    except Exception as err:
        raise _diagnose_corrupt(folder) or SeriesError("corrupt_file", f"{folder}: {err}") from err
    if not images:
        raise SeriesError("not_found", f"{folder} has no DICOM file of series {scan.series_instance_uid}")
    return images, folder


def check_geometry(scan: Any, images: list[Any], folder: str) -> tuple[np.ndarray, list[str]]:
    """The checks listed in the module docstring; returns the sorted z positions and warnings."""
    warnings: list[str] = []
    n_files = len(_dcm_files(folder))
    if n_files > len(images):
        warnings.append(f"{n_files - len(images)} file(s) in {folder} not used (other series or duplicate z)")
    first = images[0]
    for img in images[1:]:
        for tag in ("Rows", "Columns"):
            if int(getattr(img, tag)) != int(getattr(first, tag)):
                raise SeriesError("mixed_series", f"{img.filename}: {tag} {getattr(img, tag)} != "
                                                  f"{getattr(first, tag)} of {first.filename}")
        if not np.allclose([float(v) for v in img.PixelSpacing], [float(v) for v in first.PixelSpacing]):
            raise SeriesError("mixed_series", f"{img.filename}: PixelSpacing {list(img.PixelSpacing)} != "
                                              f"{list(first.PixelSpacing)} of {first.filename}")
        if not np.allclose([float(v) for v in img.ImageOrientationPatient],
                           [float(v) for v in first.ImageOrientationPatient], atol=1e-4):
            raise SeriesError("mixed_series", f"{img.filename}: ImageOrientationPatient differs from {first.filename}")
    iop = np.array([float(v) for v in first.ImageOrientationPatient])
    if not np.allclose(iop, AXIAL, atol=1e-3):
        raise SeriesError("unsupported_orientation", f"{folder}: ImageOrientationPatient {iop.tolist()} is not axial")
    zs = np.array([float(img.ImagePositionPatient[2]) for img in images])
    db = np.asarray(scan.slice_zvals, dtype=float)
    missing = [z for z in db if np.abs(zs - z).min() > Z_TOLERANCE]
    if missing:
        shown = ", ".join(f"{z:.2f}" for z in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise SeriesError("missing_slice", f"{folder}: {len(missing)} of {len(db)} slices missing (no file at "
                                           f"z = {shown} mm)")
    extra = [z for z in zs if np.abs(db - z).min() > Z_TOLERANCE]
    if extra:
        shown = ", ".join(f"{z:.2f}" for z in extra[:10])
        raise SeriesError("slice_mismatch", f"{folder}: {len(extra)} file(s) at z positions not in pylidc's "
                                            f"database (z = {shown} mm)")
    problem = spacing_problem(zs)
    if problem:
        raise SeriesError("uneven_spacing", f"{folder}: {problem}")
    return zs, warnings


def spacing_problem(zs: np.ndarray, axis: str = "z") -> str | None:
    """Why sorted slice positions ``zs`` (mm) are not evenly spaced (a gap differing from the median gap by more
    than ``SPACING_TOLERANCE``), or ``None`` when they are."""
    zs = np.asarray(zs, dtype=float)
    if len(zs) <= 2:
        return None
    gaps = np.diff(zs)
    med = float(np.median(gaps))
    worst = int(np.argmax(np.abs(gaps - med)))
    if med <= 0 or abs(gaps[worst] - med) > SPACING_TOLERANCE * med:
        return (f"gap of {gaps[worst]:.3f} mm between {axis} = {zs[worst]:.2f} and {zs[worst + 1]:.2f} mm "
                f"(median {med:.3f} mm)")
    return None


def read_series(scan: Any) -> SeriesVolume:
    """Read and check one scan's series (pylidc's loading path); the HU volume in ``[z, y, x]`` order."""
    images, folder = load_images(scan)
    zs, warnings = check_geometry(scan, images, folder)
    slices = np.empty((len(images), int(images[0].Rows), int(images[0].Columns)), dtype=np.int16)
    for k, img in enumerate(images):  # what pylidc's to_volume() computes, without reading the files again
        try:
            hu = img.pixel_array.astype(np.float32) * float(img.RescaleSlope) + float(img.RescaleIntercept)
        except Exception as err:
            raise SeriesError("corrupt_file", f"{img.filename}: pixel data cannot be decoded ({err})") from err
        slices[k] = np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
    first = images[0]
    row_mm, col_mm = (float(v) for v in first.PixelSpacing)  # DICOM: (row spacing, column spacing)
    dz = float(np.median(np.diff(zs))) if len(zs) > 1 else float(first.SliceThickness)
    iop = [float(v) for v in first.ImageOrientationPatient]
    xdir, ydir = np.array(iop[:3]), np.array(iop[3:])
    zdir = np.cross(xdir, ydir)
    direction = np.stack([xdir, ydir, zdir], axis=1)  # columns: index axes x, y, z
    ipp = [float(v) for v in first.ImagePositionPatient]
    return SeriesVolume(hu=slices, spacing=(col_mm, row_mm, dz), origin=(ipp[0], ipp[1], ipp[2]),
                        direction=tuple(direction.ravel().tolist()), zvals=zs, folder=str(folder),
                        warnings=warnings)


def find_series(root: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Every folder under ``root`` holding ``*.dcm`` files: its patient, study and series UIDs (read from
    the first readable file's header). Returns (series, unreadable folders with the reason)."""
    import pydicom

    found, bad = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        files = sorted(f for f in filenames if f.endswith(".dcm") and not f.startswith("."))
        if not files:
            continue
        info, errors = None, []
        for name in files[:5]:
            try:
                ds = pydicom.dcmread(os.path.join(dirpath, name), stop_before_pixels=True,
                                     specific_tags=["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality"])
                info = {"folder": dirpath, "patient_id": str(ds.get("PatientID", "")).strip(),
                        "study_instance_uid": str(ds.StudyInstanceUID).strip(),
                        "series_instance_uid": str(ds.SeriesInstanceUID).strip(),
                        "modality": str(ds.get("Modality", "")), "n_files": len(files)}
                break
            except Exception as err:
                errors.append(f"{name}: {err}")
        if info is None:
            bad.append({"folder": dirpath, "reason": "corrupt_file",
                        "detail": f"no readable DICOM header among the first files ({'; '.join(errors)})"})
        else:
            found.append(info)
    return found, bad
