"""One DICOM CT series (files of one SeriesInstanceUID, or one multi-frame file) as a :class:`CTVolume` in HU.

Pixels are decoded by pydicom 3 with the pylibjpeg plugins: uncompressed, RLE Lossless
(``pylibjpeg-rle`` or pydicom's own decoder), JPEG Lossless and JPEG-LS (``pylibjpeg-libjpeg``), JPEG 2000
lossless and lossy (``pylibjpeg-openjpeg``). HU = stored value x RescaleSlope + RescaleIntercept.

Geometry in DICOM LPS patient mm: slices sorted along the slice normal (row cosine x column cosine),
``origin`` = ImagePositionPatient of the first, ``direction`` columns = row cosine, column cosine, normal,
``spacing`` = (column spacing, row spacing, median gap). Refused with :class:`SeriesRefused`, before any
pixel is decoded:

- ``not_ct``: Modality is not CT (an MR, PET... has no HU);
- ``localizer``: ImageType contains LOCALIZER (a scout view, not a volume);
- ``mixed_series``: the images differ in size, pixel spacing or orientation;
- ``non_orthogonal``: row and column cosines not unit length or not orthogonal;
- ``gantry_tilt``: the slices do not stack along their normal (positions shift sideways by more than half a
  pixel): a sheared grid. Refused rather than resampled; resample it to an orthogonal grid first (e.g.
  dcm2niix corrects gantry tilt) and open the NIfTI. An oblique but orthogonal grid is read, with a warning;
- ``too_few_slices``: fewer than ``MIN_SLICES`` (8) distinct slice positions;
- ``uneven_spacing``: gaps between slices differ from the median gap by more than
  :data:`lidc_cdam.data.lidc.dicom_series.SPACING_TOLERANCE` (5 %), e.g. a missing slice;
- ``undecodable``: pixel data that cannot be decoded (the file and transfer syntax are named);
- ``bad_geometry``: ImageOrientationPatient, ImagePositionPatient or PixelSpacing not finite, a pixel spacing
  <= 0;
- ``bad_rescale``: RescaleSlope <= 0 or not finite (0 is not taken as 1), RescaleIntercept not finite (classic
  images and the Pixel Value Transformation of enhanced frames).

Several images at one slice position (closer than ``DUPLICATE_MM`` along the normal): the one with the highest
InstanceNumber is kept, ties broken by the latest acquisition time (AcquisitionDateTime, or AcquisitionDate +
AcquisitionTime; FrameAcquisitionDateTime for enhanced frames), then the highest SOPInstanceUID (compared
component by component as integers): the same volume whatever the files' names or listing order. A warning
names how many were dropped and which (file names, at most five).

Values (:mod:`lidc_cdam.ct.values`): NaN or infinite pixels (float pixel data) are stored as -1000 HU and
marked in :attr:`CTVolume.invalid`, with a warning; implausible HU give a warning.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from lidc_cdam.ct.errors import SeriesRefused
from lidc_cdam.ct.series import SeriesInfo
from lidc_cdam.ct.values import set_warnings, to_hu, value_warnings
from lidc_cdam.ct.volume import CTVolume
from lidc_cdam.data.lidc.dicom_series import spacing_problem

MIN_SLICES = 8  # below this a 32 mm crop is mostly padding even at 4 mm slices
DUPLICATE_MM = 0.01  # slices closer than this along the normal are the same slice
ORTHO_TOL = 1e-3  # |r.c|, | |r| - 1 |, | |c| - 1 |
AXIS_TOL = 1e-3  # a direction cosine this close to a patient axis counts as axial / coronal / sagittal


def _seq_item(ds: Any, name: str) -> Any | None:
    seq = ds.get(name)
    return seq[0] if seq else None


def _number(obj: Any, name: str, default: float) -> float:
    """A numeric attribute of a dataset or item; ``default`` when absent or empty (0 stays 0)."""
    value = obj.get(name) if obj is not None else None
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    return float(value)


def _frame_geometry(ds: Any, shared: Any, frame: Any) -> tuple[list[float], list[float], list[float], float, float]:
    """(IOP, IPP, PixelSpacing, slope, intercept) of a classic image (``frame`` None) or an enhanced frame."""
    if frame is None:
        return ([float(v) for v in ds.ImageOrientationPatient], [float(v) for v in ds.ImagePositionPatient],
                [float(v) for v in ds.PixelSpacing], _number(ds, "RescaleSlope", 1.0),
                _number(ds, "RescaleIntercept", 0.0))

    def item(name: str) -> Any:
        for group in (frame, shared):
            found = _seq_item(group, name) if group is not None else None
            if found is not None:
                return found
        return None

    orient, pos, meas, trans = (item("PlaneOrientationSequence"), item("PlanePositionSequence"),
                                item("PixelMeasuresSequence"), item("PixelValueTransformationSequence"))
    if orient is None or pos is None or meas is None:
        raise KeyError("PlaneOrientation / PlanePosition / PixelMeasures functional groups")
    rescale = trans if trans is not None else ds
    return ([float(v) for v in orient.ImageOrientationPatient], [float(v) for v in pos.ImagePositionPatient],
            [float(v) for v in meas.PixelSpacing], _number(rescale, "RescaleSlope", 1.0),
            _number(rescale, "RescaleIntercept", 0.0))


def _check_values(path: Path, frame: int | None, iop: list[float], ipp: list[float], ps: list[float],
                  slope: float, inter: float) -> None:
    """``bad_geometry`` / ``bad_rescale`` refusals of one image (or frame) of ``path``."""
    at = f" (frame {frame + 1})" if frame is not None else ""
    for name, values, n in (("ImageOrientationPatient", iop, 6), ("ImagePositionPatient", ipp, 3),
                            ("PixelSpacing", ps, 2)):
        if len(values) != n or not np.all(np.isfinite(values)):
            raise SeriesRefused(path, "bad_geometry", f"{name}{at} is {values}: not {n} finite numbers")
    if min(ps) <= 0:
        raise SeriesRefused(path, "bad_geometry", f"PixelSpacing{at} is {ps}: a pixel spacing must be > 0 mm")
    if not np.isfinite(slope) or slope <= 0:
        raise SeriesRefused(path, "bad_rescale", f"RescaleSlope{at} is {slope:g}: it must be a finite number > 0 "
                            "(HU = stored value x RescaleSlope + RescaleIntercept)")
    if not np.isfinite(inter):
        raise SeriesRefused(path, "bad_rescale", f"RescaleIntercept{at} is {inter:g}: not a finite number")


def _uid_key(uid: str) -> tuple[int, ...]:
    return tuple(int(p) for p in uid.split(".") if p.isdigit())


def _acquired(ds: Any, frame: Any) -> str:
    """When an image (or frame) was acquired, as DICOM DT text (a tie-break between duplicates)."""
    content = _seq_item(frame, "FrameContentSequence") if frame is not None else None
    if content is not None and content.get("FrameAcquisitionDateTime"):
        return str(content.FrameAcquisitionDateTime).strip()
    if ds.get("AcquisitionDateTime"):
        return str(ds.AcquisitionDateTime).strip()
    return (str(ds.get("AcquisitionDate", "") or "") + str(ds.get("AcquisitionTime", "") or "")).strip()


def _preference(s: dict[str, Any]) -> tuple:
    """Which of two images at one slice position is kept (the greater): InstanceNumber, then acquisition time,
    then SOPInstanceUID (numerically, component by component), then the frame number; never the file name."""
    instance = s["instance"]
    return (instance is not None, instance if instance is not None else 0, s["acquired"], _uid_key(s["sop"]),
            s["frame"] if s["frame"] is not None else -1)


def _slices(info: SeriesInfo) -> list[dict[str, Any]]:
    """One entry per 2D image: file, frame index (None for single-frame), geometry, rescale."""
    out = []
    for path, ds in zip(info.files, info.headers, strict=True):
        n = int(ds.get("NumberOfFrames", 1) or 1)
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        shared = _seq_item(ds, "SharedFunctionalGroupsSequence")
        for k in range(n):
            enhanced = per_frame is not None or shared is not None
            frame = per_frame[k] if per_frame is not None and k < len(per_frame) else None
            try:
                iop, ipp, ps, slope, inter = _frame_geometry(ds, shared, frame if enhanced else None)
            except (AttributeError, KeyError, TypeError, ValueError) as err:
                raise SeriesRefused(path, "mixed_series", f"no usable image geometry (ImageOrientationPatient, "
                                    f"ImagePositionPatient, PixelSpacing): {err}") from None
            if not enhanced and n > 1:
                raise SeriesRefused(path, "mixed_series", f"a multi-frame image of {n} frames without per-frame "
                                    "positions (not a volume)")
            _check_values(path, k if n > 1 else None, iop, ipp, ps, slope, inter)
            number = ds.get("InstanceNumber")
            try:
                instance = int(number) if number not in (None, "") else None
            except (TypeError, ValueError):
                instance = None
            out.append({"path": path, "frame": k if n > 1 else None, "iop": np.array(iop), "ipp": np.array(ipp),
                        "ps": np.array(ps), "slope": slope, "inter": inter, "rows": int(ds.Rows),
                        "cols": int(ds.Columns), "sop": str(ds.get("SOPInstanceUID", "") or "").strip(),
                        "instance": instance, "acquired": _acquired(ds, frame if enhanced else None)})
    return out


def _one_per_position(slices: list[dict[str, Any]], normal: np.ndarray) -> tuple[list[dict[str, Any]],
                                                                                list[dict[str, Any]]]:
    """``(kept, dropped)``: slices sorted along ``normal``; of images closer than ``DUPLICATE_MM`` along it the one
    :func:`_preference` ranks first is kept, whatever the files' names or listing order."""
    ordered = sorted(slices, key=lambda s: (float(s["ipp"] @ normal), _preference(s)))
    kept: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    group: list[dict[str, Any]] = []
    for s in [*ordered, None]:
        if s is not None and group and float((s["ipp"] - group[0]["ipp"]) @ normal) < DUPLICATE_MM:
            group.append(s)
            continue
        if group:
            best = max(group, key=_preference)
            kept.append(best)
            dropped.extend(g for g in group if g is not best)
        group = [s] if s is not None else []
    return kept, dropped


def check_series(info: SeriesInfo, where: object) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The refusals of the module docstring, from the headers; the slices sorted along the normal and the
    grid (spacing, origin, direction, warnings)."""
    modality = info.modality or "(none)"
    if modality != "CT":
        raise SeriesRefused(where, "not_ct", f"series {info.uid} is modality {modality}, not CT: its values are "
                            "not Hounsfield units and the models were trained on CT")
    if info.localizer:
        raise SeriesRefused(where, "localizer", f"series {info.uid} is a localizer (ImageType "
                            f"{'/'.join(info.image_type)}): a scout view, not a CT volume")
    slices = _slices(info)
    first = slices[0]
    for s in slices[1:]:
        for key, what in (("rows", "Rows"), ("cols", "Columns")):
            if s[key] != first[key]:
                raise SeriesRefused(s["path"], "mixed_series", f"{what} {s[key]} differs from {first[key]} of "
                                    f"{first['path'].name} (series {info.uid} mixes images)")
        if not np.allclose(s["ps"], first["ps"], atol=1e-4):
            raise SeriesRefused(s["path"], "mixed_series", f"PixelSpacing {s['ps'].tolist()} differs from "
                                f"{first['ps'].tolist()} of {first['path'].name}")
        if not np.allclose(s["iop"], first["iop"], atol=1e-4):
            raise SeriesRefused(s["path"], "mixed_series", f"ImageOrientationPatient {s['iop'].tolist()} differs "
                                f"from {first['iop'].tolist()} of {first['path'].name}")
    r, c = first["iop"][:3], first["iop"][3:]
    if (abs(float(r @ c)) > ORTHO_TOL or abs(np.linalg.norm(r) - 1) > ORTHO_TOL
            or abs(np.linalg.norm(c) - 1) > ORTHO_TOL):
        raise SeriesRefused(where, "non_orthogonal", f"ImageOrientationPatient {first['iop'].tolist()} is not two "
                            "orthogonal unit vectors: not a rectilinear grid")
    r, c = r / np.linalg.norm(r), c / np.linalg.norm(c)
    normal = np.cross(r, c)
    warnings: list[str] = []
    kept, dropped = _one_per_position(slices, normal)
    if dropped:
        names = [s["path"].name + (f" (frame {s['frame'] + 1})" if s["frame"] is not None else "") for s in dropped]
        warnings.append(f"{len(dropped)} image(s) at an already seen slice position dropped, keeping at each position "
                        "the highest InstanceNumber (then the latest acquisition time, then the highest "
                        f"SOPInstanceUID): {', '.join(names[:5])}" + (" ..." if len(names) > 5 else ""))
    if len(kept) < MIN_SLICES:
        raise SeriesRefused(where, "too_few_slices", f"series {info.uid} has {len(kept)} slice(s); at least "
                            f"{MIN_SLICES} are needed for a CT volume")
    pos = np.stack([s["ipp"] for s in kept])
    along = (pos - pos[0]) @ normal
    sideways = np.linalg.norm((pos - pos[0]) - along[:, None] * normal[None, :], axis=1)
    if sideways.max() > 0.5 * float(first["ps"].min()):
        worst = int(np.argmax(sideways))
        angle = float(np.degrees(np.arctan2(sideways[worst], abs(along[worst]))))
        tilt = info.headers[0].get("GantryDetectorTilt")
        raise SeriesRefused(where, "gantry_tilt", f"the slices do not stack along their normal (shifted "
                            f"{sideways.max():.2f} mm sideways, about {angle:.1f} degrees"
                            + (f", GantryDetectorTilt {float(tilt):g}" if tilt not in (None, "") else "")
                            + "): gantry tilt. Not resampled here; correct it first (e.g. dcm2niix) and open "
                            "the NIfTI")
    problem = spacing_problem(along, axis="position")
    if problem:
        raise SeriesRefused(where, "uneven_spacing", f"uneven slice spacing: {problem}; a slice missing?")
    direction = np.stack([r, c, normal], axis=1)
    if not all(np.isclose(np.abs(col), 1.0, atol=AXIS_TOL).any() for col in direction.T):
        warnings.append("oblique orientation: the grid is rotated in patient space (the models were trained on "
                        "axial LIDC-IDRI scans)")
    dz = float(np.median(np.diff(along))) if len(along) > 1 else 1.0
    ps = first["ps"]  # DICOM PixelSpacing: (row spacing, column spacing)
    grid = {"spacing": (float(ps[1]), float(ps[0]), dz), "origin": tuple(float(v) for v in pos[0]),
            "direction": tuple(float(v) for v in direction.ravel()), "warnings": warnings}
    return kept, grid


def _decode(path: Path, cache: dict[Path, Any]) -> np.ndarray:
    import pydicom

    if path not in cache:
        cache.clear()  # one multi-frame file at a time in memory
        try:
            ds = pydicom.dcmread(path)
            cache[path] = ds.pixel_array
        except Exception as err:
            ts = "?"
            with contextlib.suppress(Exception):
                ts = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID.name
            raise SeriesRefused(path, "undecodable", f"pixel data ({ts}) cannot be decoded: {err}") from None
    return cache[path]


def read_series(info: SeriesInfo, where: object = None) -> CTVolume:
    """A listed series (:func:`lidc_cdam.ct.series.list_series`) as a :class:`CTVolume` in HU (int16)."""
    where = info.folder if where is None else where
    kept, grid = check_series(info, where)
    hu = np.empty((len(kept), kept[0]["rows"], kept[0]["cols"]), dtype=np.int16)
    invalid: np.ndarray | None = None
    clipped = 0
    cache: dict[Path, Any] = {}
    for k, s in enumerate(kept):
        arr = _decode(s["path"], cache)
        if s["frame"] is not None:
            arr = arr[s["frame"]]
        if arr.ndim != 2 or arr.shape != hu.shape[1:]:
            raise SeriesRefused(s["path"], "mixed_series", f"decoded image of shape {arr.shape}, not a grey-level "
                                f"{hu.shape[1]} x {hu.shape[2]} image")
        hu[k], bad, n_clipped = to_hu(arr.astype(np.float64) * s["slope"] + s["inter"])
        clipped += n_clipped
        if bad is not None:
            if invalid is None:
                invalid = np.zeros(hu.shape, dtype=bool)
            invalid[k] = bad
    ds = info.headers[0]
    patient = str(ds.get("PatientID", "") or "").strip()
    meta = {"source": str(where), "folder": str(info.folder), "n_files": len(info.files),
            "series_instance_uid": info.uid, "study_instance_uid": str(ds.get("StudyInstanceUID", "")).strip(),
            "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "")).strip(), "patient_id": patient,
            "modality": info.modality, "series_description": info.description,
            "transfer_syntax": str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "")),
            "sop_instance_uids": [s["sop"] for s in kept]}
    set_warnings(meta, grid["warnings"] + value_warnings(hu, invalid, clipped))
    return CTVolume(hu, grid["spacing"], grid["origin"], grid["direction"], name=f"CT {patient}".strip(),
                    meta=meta, source_files=tuple(dict.fromkeys(Path(s["path"]) for s in kept)), invalid=invalid)
