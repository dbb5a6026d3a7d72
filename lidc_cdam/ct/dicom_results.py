"""Results for a PACS (docs/method.md, "Any CT: crop, ensemble, DICOM results"): CDAM maps, the explained region
and the point predictions as DICOM objects on the source CT series, through highdicom. No Qt, and independent of how the
maps are computed: the inputs are plain arrays on the source series' grid (``[z, y, x]``, the grid of
:func:`lidc_cdam.ct.read_ct`: slices sorted along the slice normal).

- :func:`write_parametric_map`: one CDAM as a **Parametric Map** (``highdicom.pm.ParametricMap``): float32
  pixel data, the source series' Frame of Reference, per-frame plane positions and per-frame references to the
  source slices, and a real-world value mapping whose LUT explanation says "CDAM score, unitless" (unit UCUM
  ``1`` "no units", quantity the private code ``(CDAM, 99LIDCCDAM, "CDAM score")``);
- :func:`write_segmentation`: the explained region (e.g. the 32 mm crop box around the point) as a binary
  **Segmentation** (``highdicom.seg.Segmentation``);
- :func:`write_structured_report`: the predictions, their spread over the fold models and the trust flag of each
  point as a **TID 1500 Measurement Report** in a Comprehensive 3D SR (``highdicom.sr``), one measurement group
  per point (tracking id = the point id, a 3D POINT region in patient mm).

Every object gets fresh SOP Instance and Series UIDs, shares the source's StudyInstanceUID and
FrameOfReferenceUID, references the source instances (ReferencedSeriesSequence / SourceImageSequence for the
images, the evidence sequence for the report), and says "research use, not for diagnostic use" (:data:`RESEARCH_USE`):
in the SeriesDescription and ContentQualification (= RESEARCH) of all three; in ImageComments of the map and the
segmentation; in the report's content tree, as the device observer's name and as a qualitative evaluation of
every measurement group. Codes of lidc-cdam's own are in the private coding scheme ``99LIDCCDAM``.

``source`` is a list of pydicom datasets of the series (headers suffice, pixel data is not needed), their file
paths, or a :class:`~lidc_cdam.ct.volume.CTVolume` read from DICOM (its ``source_files``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lidc_cdam.ct.dicom_reader import check_series
from lidc_cdam.ct.errors import CTError
from lidc_cdam.ct.series import SeriesInfo
from lidc_cdam.io import atomic_write

RESEARCH_USE = "research use, not for diagnostic use"
SCHEME = "99LIDCCDAM"  # private coding scheme of lidc-cdam (DICOM PS3.16: "99" prefix)
MANUFACTURER = "lidc-cdam"
MODEL_NAME = "lidc-cdam CDAM"
CDAM_EXPLANATION = "CDAM score, unitless"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lidc-cdam")
    except Exception:
        return "0"


def _codes():
    """The codes used (imported lazily: highdicom is only needed here)."""
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    return {
        "no_units": codes.UCUM.NoUnits,  # (1, UCUM, "no units")
        "percent": codes.UCUM.Percent,
        "mm": codes.UCUM.Millimeter,
        "cdam": Code("CDAM", SCHEME, "CDAM score"),
        "region_category": codes.SCT.SpatialAndRelationalConcept,  # (309825002, SCT)
        "region_type": Code("EXPLREGION", SCHEME, "Explained region"),
        "mean": codes.SCT.Mean,  # (373098007, SCT): the fold ensemble's mean prediction
        "sd": codes.SCT.StandardDeviation,  # (386136009, SCT): its spread over the fold models
        "trust_percentile": Code("TRUSTPCT", SCHEME, "Trust percentile"),
        "trust_flag": Code("TRUSTFLAG", SCHEME, "Out-of-distribution warning"),
        "training_data": Code("TRAININGDATA", SCHEME, "Training data of the models"),
        "unlike": Code("UNLIKE", SCHEME, "unlike the training data"),
        "like": Code("LIKE", SCHEME, "like the training data"),
        "intended_use": Code("INTENDEDUSE", SCHEME, "Intended use"),
        "research_use": Code("RESEARCH", SCHEME, RESEARCH_USE),
        "ai": codes.cid7162.ArtificialIntelligence,  # algorithm family (CID 7162)
        "device": codes.DCM.Device,
        "procedure": codes.LN.CTUnspecifiedBodyRegion if hasattr(codes.LN, "CTUnspecifiedBodyRegion")
        else Code("25045-6", "LN", "CT unspecified body region"),
    }


def prediction_code(name: str):
    """The concept name of a prediction (a model output such as ``malignancy``, ``spiculation``)."""
    from pydicom.sr.coding import Code

    return Code(name[:16].upper(), SCHEME, name)


# ------------------------------------------------------------------------------------------ source series


#: Type 2 attributes of the patient and study modules that the results copy from the source (present,
#: possibly empty); a source without them gets them empty
TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                       "ReferringPhysicianName", "StudyID", "AccessionNumber")


def load_source_datasets(source: Any) -> list[Any]:
    """The source series as pydicom datasets (headers): ``source`` is a list of datasets or file paths, or a
    :class:`~lidc_cdam.ct.volume.CTVolume` read from DICOM (``source_files``)."""
    import pydicom
    from pydicom import Dataset

    files = getattr(source, "source_files", None)
    if files is not None:
        if not files:
            raise CTError(f"{getattr(source, 'name', 'volume')}: not read from a DICOM series (no source files): "
                          "DICOM results need the source series")
        source = files
    out = []
    for item in source:
        ds = item if isinstance(item, Dataset) else pydicom.dcmread(item, stop_before_pixels=True)
        missing = [kw for kw in TYPE2_PATIENT_STUDY if kw not in ds]
        if missing:  # Type 2: must be present, may be empty; some writers leave them out
            import copy

            ds = copy.deepcopy(ds) if ds is item else ds
            for kw in missing:
                setattr(ds, kw, "")
        out.append(ds)
    if not out:
        raise CTError("no source datasets: DICOM results need the source CT series")
    return out


def source_grid(source: Any) -> tuple[list[Any], dict[str, Any]]:
    """The source datasets in grid order (one per slice of the grid ``[z, y, x]``, duplicates dropped; one
    dataset for a multi-frame source) and the grid: ``ipp`` (slice positions, patient mm), ``iop``,
    ``pixel_spacing`` (row, column), ``slice_spacing``, ``shape`` (z, y, x), ``frames`` (frame number per slice,
    None for single-frame). The same sorting and checks as :func:`lidc_cdam.ct.read_ct`."""
    datasets = load_source_datasets(source)
    first = datasets[0]
    uids = {str(ds.SeriesInstanceUID) for ds in datasets}
    if len(uids) > 1:
        raise CTError(f"source datasets of {len(uids)} series: DICOM results reference one source series")
    for ds in datasets:
        if "FrameOfReferenceUID" not in ds:
            raise CTError(f"source image {ds.get('SOPInstanceUID', '?')} has no FrameOfReferenceUID")
    files = [str(getattr(ds, "filename", "") or "") for ds in datasets]
    names = [Path(f) if f and files.count(f) == 1 else Path(f"dataset-{k}") for k, f in enumerate(files)]
    info = SeriesInfo(uid=str(first.SeriesInstanceUID), modality=str(first.get("Modality", "") or ""),
                      description="", number=None, rows=int(first.Rows), columns=int(first.Columns),
                      n_slices=len(datasets), size_bytes=0, files=names, headers=datasets,
                      image_type=tuple(str(v).strip().upper() for v in (first.get("ImageType") or ())))
    kept, grid = check_series(info, where=names[0].parent if len(names) else "source")
    by_name = dict(zip(names, datasets, strict=True))
    ordered = list(dict.fromkeys(id(by_name[s["path"]]) for s in kept))
    lookup = {id(ds): ds for ds in datasets}
    geometry = {"ipp": np.stack([s["ipp"] for s in kept]), "iop": kept[0]["iop"], "pixel_spacing": kept[0]["ps"],
                "slice_spacing": float(grid["spacing"][2]),
                "shape": (len(kept), kept[0]["rows"], kept[0]["cols"]),
                "frames": [None if s["frame"] is None else s["frame"] + 1 for s in kept]}
    return [lookup[i] for i in ordered], geometry


def crop_grid(crop: Mapping[str, Any]) -> dict[str, Any]:
    """The grid of a crop (its ``crop_to_world``: 1 mm, patient axes) as :func:`source_grid` describes a series:
    one axial frame per crop slice ``[z]`` (rows along +y, columns along +x), on the source's Frame of Reference."""
    to_world = np.asarray(crop["crop_to_world"], dtype=float)
    shape = tuple(int(v) for v in np.asarray(crop["image"]).shape)
    ipp = np.stack([(to_world @ [z, 0.0, 0.0, 1.0])[:3] for z in range(shape[0])])
    row_cos, col_cos = to_world[:3, 2], to_world[:3, 1]  # along a row: + column index (x); down a column: + y
    step = float(np.linalg.norm(to_world[:3, 0]))
    return {"ipp": ipp, "iop": np.concatenate([row_cos, col_cos]),
            "pixel_spacing": (float(np.linalg.norm(col_cos)), float(np.linalg.norm(row_cos))),
            "slice_spacing": step, "shape": shape}


def _grid_for(source: Any, crop: Mapping[str, Any] | None) -> tuple[list[Any], dict[str, Any]]:
    """The source datasets and the grid the array is on: the crop's own grid when ``crop`` is given (a few MB
    per map, whatever the series' size), else the whole source series'."""
    datasets, grid = source_grid(source)
    return datasets, (crop_grid(crop) if crop is not None else grid)


def _spatial(grid: dict[str, Any]):
    from highdicom import CoordinateSystemNames, PixelMeasuresSequence, PlaneOrientationSequence, PlanePositionSequence

    measures = PixelMeasuresSequence(pixel_spacing=[float(v) for v in grid["pixel_spacing"]],
                                     slice_thickness=grid["slice_spacing"],
                                     spacing_between_slices=grid["slice_spacing"])
    orientation = PlaneOrientationSequence(CoordinateSystemNames.PATIENT, [float(v) for v in grid["iop"]])
    positions = [PlanePositionSequence(CoordinateSystemNames.PATIENT, [float(v) for v in p]) for p in grid["ipp"]]
    return measures, orientation, positions


def _description(what: str) -> str:
    """A SeriesDescription (LO, 64 characters) that always ends with the research-use statement."""
    tail = f" - {RESEARCH_USE}"
    return what[: 64 - len(tail)] + tail


def _fix_spacing(ds: Any, grid: dict[str, Any]) -> None:
    """highdicom copies the source's pixel measures; SpacingBetweenSlices is set to the measured slice step (a
    source's own value may be missing or wrong, and readers take it as the spacing hint)."""
    measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    measures.SpacingBetweenSlices = f"{grid['slice_spacing']:.6g}"


def _say_research(ds: Any, what: str) -> None:
    ds.SeriesDescription = _description(what)
    ds.ImageComments = f"{what}. lidc-cdam output for {RESEARCH_USE}."


def _common(series_number: int) -> dict[str, Any]:
    from highdicom import UID

    return {"series_instance_uid": UID(), "series_number": int(series_number), "sop_instance_uid": UID(),
            "instance_number": 1, "manufacturer": MANUFACTURER, "manufacturer_model_name": MODEL_NAME,
            "software_versions": _version(), "device_serial_number": "0"}


def _check_shape(array: np.ndarray, grid: dict[str, Any], what: str) -> None:
    if tuple(array.shape) != tuple(grid["shape"]):
        raise ValueError(f"{what} of shape {tuple(array.shape)} is not on the source series' grid {grid['shape']} "
                         "(z, y, x)")


# ------------------------------------------------------------------------------------------ writers


def write_parametric_map(source: Any, map_zyx: np.ndarray, target_name: str, out_path: str | Path, *,
                         series_number: int = 901, content_label: str = "CDAM",
                         crop: Mapping[str, Any] | None = None) -> Path:
    """One CDAM ``map_zyx`` (float, on the source series' grid, or with ``crop`` on that crop's grid, e.g. the
    ``[32, 32, 32]`` map of a point) as a DICOM Parametric Map at ``out_path``.

    Float32 pixel data with an identity real-world value mapping (LUT label ``content_label``, explanation
    "CDAM score, unitless: <target>", unit UCUM ``1``, quantity ``(CDAM, 99LIDCCDAM, "CDAM score")``); a
    symmetric window around 0; ContentQualification RESEARCH, SeriesDescription and ImageComments say
    "research use, not for diagnostic use"."""
    import highdicom as hd

    datasets, grid = _grid_for(source, crop)
    arr = np.asarray(map_zyx, dtype=np.float32)
    _check_shape(arr, grid, "map")
    if not np.isfinite(arr).all():
        raise ValueError("the map has NaN or infinite values")
    c = _codes()
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        hi = lo + 1.0
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=content_label[:16], lut_explanation=f"{CDAM_EXPLANATION}: {target_name}"[:64], unit=c["no_units"],
        value_range=(lo, hi), slope=1.0, intercept=0.0, quantity_definition=c["cdam"])
    width = 2.0 * max(abs(lo), abs(hi)) or 1.0
    measures, orientation, positions = _spatial(grid)
    label = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in content_label.upper())[:16] or "CDAM"
    pm = hd.pm.ParametricMap(
        source_images=datasets, pixel_array=arr, **_common(series_number),
        contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.0, window_width=width)],
        content_label=label, content_description=f"CDAM {target_name}"[:64],
        content_qualification=hd.ContentQualificationValues.RESEARCH,
        pixel_measures=measures, plane_orientation=orientation, plane_positions=positions)
    _fix_spacing(pm, grid)
    _say_research(pm, f"CDAM {target_name}")
    if "Laterality" not in pm:  # General Series, type 2C (the lungs are paired): the source's, else empty
        pm.Laterality = datasets[0].get("Laterality", "")
    return _save(pm, out_path)


def write_segmentation(source: Any, mask_zyx: np.ndarray, label: str, out_path: str | Path, *,
                       series_number: int = 902, crop: Mapping[str, Any] | None = None) -> Path:
    """The explained region ``mask_zyx`` (bool, on the source series' grid, or with ``crop`` on that crop's grid)
    as a binary DICOM Segmentation with
    one segment (``label``; category SCT "Spatial and Relational Concept", type ``(EXPLREGION, 99LIDCCDAM,
    "Explained region")``, algorithm lidc-cdam). Every slice of the grid is a frame (empty ones kept)."""
    import highdicom as hd

    datasets, grid = _grid_for(source, crop)
    mask = np.asarray(mask_zyx).astype(bool)
    _check_shape(mask, grid, "mask")
    c = _codes()
    algorithm = hd.AlgorithmIdentificationSequence(name=MANUFACTURER, family=c["ai"], version=_version())
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label=label[:64], segmented_property_category=c["region_category"],
        segmented_property_type=c["region_type"], algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
    measures, orientation, positions = _spatial(grid)
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[segment],
        **_common(series_number), content_label="REGION",
        content_description=f"{label} ({RESEARCH_USE})"[:64], omit_empty_frames=False,
        pixel_measures=measures, plane_orientation=orientation, plane_positions=positions)
    seg.ContentQualification = "RESEARCH"  # SOP Common (the PM has it in its image module)
    _fix_spacing(seg, grid)
    _say_research(seg, f"Explained region {label}")
    return _save(seg, out_path)


def _number(value: Any) -> float:
    v = float(value)
    if not np.isfinite(v):
        raise ValueError(f"not a finite number: {value!r}")
    return v


def write_structured_report(source: Any, points: Sequence[Mapping[str, Any]], out_path: str | Path, *,
                            units: Mapping[str, str] | None = None, series_number: int = 903,
                            training_data: str | None = None, references: Sequence[Any] = ()) -> Path:
    """The points' predictions, spread and trust flag as a TID 1500 Measurement Report (Comprehensive 3D SR).

    Each point is a dict: ``point_id`` (str), ``position_mm`` (x, y, z patient mm, LPS), ``predictions``
    (name -> value), ``spread`` (name -> SD over the fold models, or None; optional), ``trust_percentile``
    (float or None) and ``trust_flag`` (True: "unlike the training data", False, or None). One measurement group
    (TID 1410 planar ROI with a 3D POINT region) per point, tracking identifier = the point id; per prediction a
    numeric measurement named ``(NAME, 99LIDCCDAM, name)`` (derivation SCT "Mean" when a spread is given), its
    spread the same concept with derivation SCT "Standard Deviation"; the trust percentile in UCUM ``%``;
    the flag and the research-use statement as qualitative evaluations. ``units``: UCUM code per prediction
    name (default ``mm`` for names ending in ``_mm``, else ``1``). ``training_data``: what the models were trained
    on, as text (:func:`lidc_cdam.models.provenance.provenance_line`, and the phantom warning), one TEXT item
    ``(TRAININGDATA, 99LIDCCDAM)`` in the report's root container. ``references``: other results of the run (the
    Parametric Maps and Segmentations: datasets or files) that the report's evidence lists beside the source."""
    import highdicom as hd
    from pydicom.sr.coding import Code

    datasets, _ = source_grid(source)
    c = _codes()
    units = dict(units or {})
    frame_uid = str(datasets[0].FrameOfReferenceUID)

    def unit_of(name: str):
        code = units.get(name) or ("mm" if name.endswith("_mm") else "1")
        return {"1": c["no_units"], "mm": c["mm"], "%": c["percent"]}.get(code, Code(code, "UCUM", code))

    groups = []
    for point in points:
        pid = str(point["point_id"])
        pos = np.asarray([_number(v) for v in point["position_mm"]], dtype=float).reshape(1, 3)
        spread = point.get("spread") or {}
        measurements = []
        for name, value in point["predictions"].items():
            sd = spread.get(name)
            measurements.append(hd.sr.Measurement(name=prediction_code(name), value=_number(value),
                                                  unit=unit_of(name), derivation=c["mean"] if sd is not None else None))
            if sd is not None:
                measurements.append(hd.sr.Measurement(name=prediction_code(name), value=_number(sd),
                                                      unit=unit_of(name), derivation=c["sd"]))
        if point.get("trust_percentile") is not None:
            measurements.append(hd.sr.Measurement(name=c["trust_percentile"], value=_number(point["trust_percentile"]),
                                                  unit=c["percent"]))
        evaluations = [hd.sr.QualitativeEvaluation(c["intended_use"], c["research_use"])]
        flag = point.get("trust_flag")
        if flag is not None:
            evaluations.append(hd.sr.QualitativeEvaluation(c["trust_flag"], c["unlike"] if flag else c["like"]))
        region = hd.sr.ImageRegion3D(graphic_type=hd.sr.GraphicTypeValues3D.POINT, graphic_data=pos,
                                     frame_of_reference_uid=frame_uid)
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=pid), referenced_region=region,
            measurements=measurements, qualitative_evaluations=evaluations))
    observer = hd.sr.ObserverContext(
        observer_type=c["device"],
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=f"{MANUFACTURER} ({RESEARCH_USE})"[:64], manufacturer_name=MANUFACTURER,
            model_name=MODEL_NAME))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=c["procedure"], imaging_measurements=groups)
    if training_data:
        report[0].ContentSequence.append(hd.sr.TextContentItem(
            name=c["training_data"], value=str(training_data),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    common = _common(series_number)
    for key in ("manufacturer_model_name", "software_versions", "device_serial_number"):
        common.pop(key)
    import pydicom

    others = [r if isinstance(r, pydicom.Dataset) else pydicom.dcmread(r, stop_before_pixels=True) for r in references]
    sr = hd.sr.Comprehensive3DSR(evidence=[*datasets, *others], content=report, **common, is_complete=True)
    sr.SeriesDescription = _description("lidc-cdam point predictions")
    sr.ContentQualification = "RESEARCH"  # SOP Common
    return _save(sr, out_path)


def _save(ds: Any, out_path: str | Path) -> Path:
    return atomic_write(out_path, lambda tmp: ds.save_as(tmp, enforce_file_format=True))
