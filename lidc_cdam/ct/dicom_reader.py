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
- ``undecodable``: pixel data that cannot be decoded (the file and transfer syntax are named).

Duplicate positions (the same slice twice) keep the first file and add a warning.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from lidc_cdam.ct.errors import SeriesRefused
from lidc_cdam.ct.series import SeriesInfo
from lidc_cdam.ct.volume import CTVolume
from lidc_cdam.data.lidc.dicom_series import spacing_problem

MIN_SLICES = 8  # below this a 32 mm crop is mostly padding even at 4 mm slices
DUPLICATE_MM = 0.01  # slices closer than this along the normal are the same slice
ORTHO_TOL = 1e-3  # |r.c|, | |r| - 1 |, | |c| - 1 |
AXIS_TOL = 1e-3  # a direction cosine this close to a patient axis counts as axial / coronal / sagittal


def _seq_item(ds: Any, name: str) -> Any | None:
    seq = ds.get(name)
    return seq[0] if seq else None


def _frame_geometry(ds: Any, shared: Any, frame: Any) -> tuple[list[float], list[float], list[float], float, float]:
    """(IOP, IPP, PixelSpacing, slope, intercept) of a classic image (``frame`` None) or an enhanced frame."""
    if frame is None:
        return ([float(v) for v in ds.ImageOrientationPatient], [float(v) for v in ds.ImagePositionPatient],
                [float(v) for v in ds.PixelSpacing], float(ds.get("RescaleSlope", 1) or 1),
                float(ds.get("RescaleIntercept", 0) or 0))

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
    slope = float(trans.get("RescaleSlope", 1) or 1) if trans is not None else float(ds.get("RescaleSlope", 1) or 1)
    inter = (float(trans.get("RescaleIntercept", 0) or 0) if trans is not None
             else float(ds.get("RescaleIntercept", 0) or 0))
    return ([float(v) for v in orient.ImageOrientationPatient], [float(v) for v in pos.ImagePositionPatient],
            [float(v) for v in meas.PixelSpacing], slope, inter)


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
            out.append({"path": path, "frame": k if n > 1 else None, "iop": np.array(iop), "ipp": np.array(ipp),
                        "ps": np.array(ps), "slope": slope, "inter": inter, "rows": int(ds.Rows),
                        "cols": int(ds.Columns), "sop": str(ds.get("SOPInstanceUID", "") or "")})
    return out


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
    slices.sort(key=lambda s: float(s["ipp"] @ normal))
    warnings: list[str] = []
    kept = [slices[0]]
    for s in slices[1:]:
        if float((s["ipp"] - kept[-1]["ipp"]) @ normal) < DUPLICATE_MM:
            continue
        kept.append(s)
    if len(kept) < len(slices):
        warnings.append(f"{len(slices) - len(kept)} image(s) at an already seen slice position ignored")
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
    cache: dict[Path, Any] = {}
    for k, s in enumerate(kept):
        arr = _decode(s["path"], cache)
        if s["frame"] is not None:
            arr = arr[s["frame"]]
        if arr.ndim != 2 or arr.shape != hu.shape[1:]:
            raise SeriesRefused(s["path"], "mixed_series", f"decoded image of shape {arr.shape}, not a grey-level "
                                f"{hu.shape[1]} x {hu.shape[2]} image")
        values = arr.astype(np.float64) * s["slope"] + s["inter"]
        hu[k] = np.clip(np.rint(values), -32768, 32767).astype(np.int16)
    ds = info.headers[0]
    patient = str(ds.get("PatientID", "") or "").strip()
    meta = {"source": str(where), "folder": str(info.folder), "n_files": len(info.files),
            "series_instance_uid": info.uid, "study_instance_uid": str(ds.get("StudyInstanceUID", "")).strip(),
            "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "")).strip(), "patient_id": patient,
            "modality": info.modality, "series_description": info.description,
            "transfer_syntax": str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "")),
            "sop_instance_uids": [s["sop"] for s in kept],
            "warnings": grid["warnings"]}
    if grid["warnings"]:
        meta["warning"] = "; ".join(grid["warnings"])
    return CTVolume(hu, grid["spacing"], grid["origin"], grid["direction"], name=f"CT {patient}".strip(),
                    meta=meta, source_files=tuple(dict.fromkeys(Path(s["path"]) for s in kept)))
