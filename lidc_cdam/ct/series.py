"""The DICOM series of a folder: listed from their headers (pydicom, no pixel data), one chosen.

:func:`list_series` reads every file's header at or below a folder (at most ``MAX_SERIES_FOLDERS`` DICOM
folders, as :func:`lidc_cdam.ct.volume.read_dicom_folder`) and groups the images by SeriesInstanceUID:
UID, modality, description, number of slices (frames), image size and bytes on disk. :func:`choose_series`
takes one by UID or by index in that list, else the largest CT series that is not a localizer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lidc_cdam.ct.errors import CTError, SeriesRefused
from lidc_cdam.ct.volume import MAX_SERIES_FOLDERS, dicom_folders

_SKIP = {"DICOMDIR"}


@dataclass
class SeriesInfo:
    """One series of a folder, from its headers; ``headers`` are pydicom datasets without pixel data."""

    uid: str
    modality: str
    description: str
    number: int | None
    rows: int
    columns: int
    n_slices: int  # images (frames of multi-frame files counted)
    size_bytes: int
    files: list[Path] = field(default_factory=list)
    headers: list[Any] = field(default_factory=list, repr=False)
    image_type: tuple[str, ...] = ()

    @property
    def folder(self) -> Path:
        return self.files[0].parent

    @property
    def localizer(self) -> bool:
        return "LOCALIZER" in self.image_type

    @property
    def size(self) -> str:
        return f"{self.n_slices} x {self.rows} x {self.columns}"

    def summary(self) -> dict[str, Any]:
        """A row of the listing: UID, modality, description, slices, size, MB, folder."""
        return {"series_instance_uid": self.uid, "modality": self.modality, "description": self.description,
                "series_number": self.number, "n_slices": self.n_slices, "size": self.size,
                "megabytes": round(self.size_bytes / 1e6, 2), "localizer": self.localizer,
                "folder": str(self.folder)}


def _frames(ds: Any) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def read_header(path: str | Path) -> Any | None:
    """A file's DICOM header (no pixel data), or ``None`` when it is not a DICOM image."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        if path.suffix.lower() != ".dcm":
            return None
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:
            return None
    except Exception:
        return None
    if "Rows" not in ds or "SeriesInstanceUID" not in ds:
        return None  # not an image (a DICOMDIR, a structured report, a presentation state...)
    return ds


def _headers(folder: Path) -> list[tuple[Path, Any]]:
    out = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_file() or entry.name.startswith(".") or entry.name.upper() in _SKIP:
            continue
        ds = read_header(entry.path)
        if ds is not None:
            out.append((Path(entry.path), ds))
    return out


def series_of(items: list[tuple[Path, Any]]) -> list[SeriesInfo]:
    """Group ``(file, header)`` pairs by SeriesInstanceUID (in the order first seen)."""
    groups: dict[str, SeriesInfo] = {}
    for path, ds in items:
        uid = str(ds.SeriesInstanceUID).strip()
        info = groups.get(uid)
        if info is None:
            number = ds.get("SeriesNumber")
            info = groups[uid] = SeriesInfo(
                uid=uid, modality=str(ds.get("Modality", "") or "").strip(),
                description=str(ds.get("SeriesDescription", "") or "").strip(),
                number=int(number) if number not in (None, "") else None,
                rows=int(ds.Rows), columns=int(ds.get("Columns", 0) or 0), n_slices=0, size_bytes=0,
                image_type=tuple(str(v).strip().upper() for v in (ds.get("ImageType") or ())))
        info.files.append(path)
        info.headers.append(ds)
        info.n_slices += _frames(ds)
        info.size_bytes += path.stat().st_size
        if "LOCALIZER" in (str(v).strip().upper() for v in (ds.get("ImageType") or ())):
            info.image_type = tuple(dict.fromkeys((*info.image_type, "LOCALIZER")))
    return list(groups.values())


def list_series(path: str | Path) -> list[SeriesInfo]:
    """Every DICOM image series at or below ``path`` (a folder, or a file whose folder is meant), sorted by
    folder, series number and UID: the order :func:`choose_series` indexes. Raises :class:`CTError` when the
    folder does not exist, holds no DICOM images, or is a whole download (too many DICOM folders)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CTError(f"{path}: no such file or folder")
    folders = dicom_folders(path, limit=MAX_SERIES_FOLDERS + 1)
    if len(folders) > MAX_SERIES_FOLDERS:
        raise CTError(f"{path}: more than {MAX_SERIES_FOLDERS} folders of DICOM files below it; choose one "
                      "series folder (or the patient folder above it)")
    items = [item for folder in folders for item in _headers(folder)]
    if not items:
        raise CTError(f"{path}: no DICOM files here (no *.dcm file and no file with a DICOM header); "
                      "choose the folder of one CT series (or a patient folder above it)")
    found = series_of(items)
    found.sort(key=lambda s: (str(s.folder), s.number if s.number is not None else 1 << 30, s.uid))
    return found


def choose_series(found: list[SeriesInfo], series: str | int | None = None, where: object = "") -> SeriesInfo:
    """One series of :func:`list_series`: ``series`` is a SeriesInstanceUID or an index in ``found``; by
    default the CT series (not a localizer) with the most slices (then the most pixels). Raises
    :class:`SeriesRefused` when the chosen one does not exist, or when no series is a usable CT series."""
    if series is not None:
        if isinstance(series, int) or (isinstance(series, str) and series.isdigit() and len(series) < 6):
            k = int(series)
            if not 0 <= k < len(found):
                raise SeriesRefused(where, "no_such_series", f"series index {k} out of range: {len(found)} "
                                    f"series here ({_listing(found)})")
            return found[k]
        for info in found:
            if info.uid == str(series).strip():
                return info
        raise SeriesRefused(where, "no_such_series", f"no series with SeriesInstanceUID {series} "
                            f"({_listing(found)})")
    ct = [s for s in found if s.modality == "CT"]
    usable = [s for s in ct if not s.localizer]
    if usable:
        return max(usable, key=lambda s: (s.n_slices, s.rows * s.columns))
    if ct:
        raise SeriesRefused(where, "localizer", f"the only CT series here are localizers (scout views), not "
                            f"volumes ({_listing(found)})")
    return max(found, key=lambda s: s.n_slices)  # not CT: the reader refuses it, naming its modality


def _listing(found: list[SeriesInfo]) -> str:
    shown = "; ".join(f"[{k}] {s.modality or '?'} {s.description or '(no description)'} {s.size}"
                      for k, s in enumerate(found[:8]))
    return shown + (" ..." if len(found) > 8 else "")
