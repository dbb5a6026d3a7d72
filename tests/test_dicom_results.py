"""DICOM results (:mod:`lidc_cdam.ct.dicom_results`): a CDAM as a Parametric Map, the explained region as a
Segmentation, the point predictions as a TID 1500 report, on a small CT series built in ``tmp_path`` (pydicom's
``CT_small.dcm`` restacked into 10 slices, as tests/test_ct_reading.py does), read back with pydicom and highdicom.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
from test_ct_reading import write_series

from lidc_cdam.ct import CTError, CTVolume, read_ct
from lidc_cdam.ct.dicom_results import (
    CDAM_EXPLANATION,
    RESEARCH_USE,
    SCHEME,
    load_source_datasets,
    write_parametric_map,
    write_segmentation,
    write_structured_report,
)

PEAK = (6, 40, 77)  # z, y, x voxel of the map's maximum


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ct") / "series"
    truth = write_series(folder, vary=False)  # slices written in shuffled file order
    volume = read_ct(folder)
    return {"folder": folder, "truth": truth, "volume": volume}


def _sources(volume):
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in volume.source_files]


def _check_references(ds, sources) -> None:
    src = sources[0]
    assert ds.StudyInstanceUID == src.StudyInstanceUID
    assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    assert ds.SOPInstanceUID not in {s.SOPInstanceUID for s in sources}
    refs = {item.SeriesInstanceUID: {r.ReferencedSOPInstanceUID for r in item.ReferencedInstanceSequence}
            for item in ds.ReferencedSeriesSequence}
    assert refs == {src.SeriesInstanceUID: {s.SOPInstanceUID for s in sources}}


def _research(ds) -> None:
    assert RESEARCH_USE in ds.SeriesDescription
    assert RESEARCH_USE in ds.ImageComments
    assert ds.ContentQualification == "RESEARCH"


def _frame_world(ds, frame: int, row: int, col: int) -> np.ndarray:
    """Patient mm of pixel (row, col) of a frame (0-based), from the per-frame / shared functional groups."""
    shared = ds.SharedFunctionalGroupsSequence[0]
    per = ds.PerFrameFunctionalGroupsSequence[frame]
    ipp = np.array(per.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
    iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    row_mm, col_mm = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    return ipp + col * col_mm * iop[:3] + row * row_mm * iop[3:]


def test_source_files_in_grid_order(series):
    vol = series["volume"]
    assert len(vol.source_files) == vol.shape[0] == 10
    z = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in vol.source_files]
    np.testing.assert_allclose(vol.index_to_world(np.array([[k, 0, 0] for k in range(10)]))[:, 2], z, atol=1e-3)
    assert [ds.SOPInstanceUID for ds in load_source_datasets(vol)] == vol.meta["sop_instance_uids"]


def test_parametric_map_peak_and_references(series, tmp_path):
    vol = series["volume"]
    rng = np.random.default_rng(0)
    cdam = rng.normal(0.0, 0.01, size=vol.shape).astype(np.float32)
    cdam[PEAK] = 1.5
    sources = _sources(vol)
    # the source datasets in shuffled order: the writer puts them on the grid itself
    path = write_parametric_map(sources[::-1], cdam, "malignancy", tmp_path / "pm.dcm", content_label="CDAM")
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
    assert "FloatPixelData" in ds and ds.BitsAllocated == 32
    _check_references(ds, sources)
    _research(ds)
    rwvm = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert rwvm.LUTExplanation.startswith(CDAM_EXPLANATION)
    unit = rwvm.MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("1", "UCUM")
    quantity = rwvm.QuantityDefinitionSequence[0].ConceptCodeSequence[0]
    assert (quantity.CodeValue, quantity.CodingSchemeDesignator) == ("CDAM", SCHEME)

    frames = ds.pixel_array  # [frames, rows, cols] in the PM's frame order
    assert frames.dtype == np.float32
    f, r, c = np.unravel_index(int(np.argmax(frames)), frames.shape)
    assert frames[f, r, c] == pytest.approx(1.5)
    got = _frame_world(ds, int(f), int(r), int(c))
    want = vol.index_to_world(np.array(PEAK))
    step = min(vol.spacing)
    assert np.linalg.norm(got - want) < 1e-3 * step + 1e-3  # same voxel (at most one voxel is allowed)
    # every frame's source image is the slice at its position
    by_uid = {s.SOPInstanceUID: s for s in sources}
    for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose([float(v) for v in by_uid[ref].ImagePositionPatient],
                                   _frame_world(ds, k, 0, 0), atol=1e-3)

    # highdicom reads it back as a volume on the same grid
    pm = hd.pm.ParametricMap.from_dataset(ds)
    volume = pm.get_volume()
    idx = np.unravel_index(int(np.argmax(volume.array)), volume.array.shape)
    np.testing.assert_allclose(volume.map_indices_to_reference(np.array([idx]))[0], want, atol=1e-3)
    assert float(volume.array.max()) == pytest.approx(1.5)
    np.testing.assert_allclose(np.sort(volume.array.ravel()), np.sort(cdam.ravel()))


def test_parametric_map_on_an_oblique_series(tmp_path):
    """An oblique (rotated, orthogonal) grid: the peak lands on its voxel through the PM's own geometry."""
    a = np.radians(20.0)
    write_series(tmp_path / "oblique", vary=False, iop=[np.cos(a), np.sin(a), 0.0, 0.0, 0.0, -1.0])
    vol = read_ct(tmp_path / "oblique")
    assert not np.allclose(vol.dmat, np.eye(3))
    cdam = np.zeros(vol.shape, np.float32)
    cdam[PEAK] = 2.0
    cdam[1, 2, 3] = -1.0
    ds = pydicom.dcmread(write_parametric_map(vol, cdam, "margin", tmp_path / "pm.dcm"))
    f, r, c = np.unravel_index(int(np.argmax(ds.pixel_array)), ds.pixel_array.shape)
    want = vol.index_to_world(np.array(PEAK))
    np.testing.assert_allclose(_frame_world(ds, int(f), int(r), int(c)), want, atol=1e-3)
    volume = hd.pm.ParametricMap.from_dataset(ds).get_volume()
    idx = np.unravel_index(int(np.argmax(volume.array)), volume.array.shape)
    np.testing.assert_allclose(volume.map_indices_to_reference(np.array([idx]))[0], want, atol=1e-3)


def test_parametric_map_from_volume_and_shape_check(series, tmp_path):
    vol = series["volume"]
    with pytest.raises(ValueError, match="grid"):
        write_parametric_map(vol, np.zeros((3, 4, 5), np.float32), "malignancy", tmp_path / "bad.dcm")
    path = write_parametric_map(vol, np.zeros(vol.shape, np.float32), "spiculation", tmp_path / "zero.dcm")
    assert pydicom.dcmread(path).NumberOfFrames == vol.shape[0]
    nifti_like = CTVolume(vol.hu, vol.spacing, vol.origin, vol.direction)  # no source files
    with pytest.raises(CTError, match="source"):
        write_segmentation(nifti_like, np.zeros(vol.shape, bool), "box", tmp_path / "none.dcm")


def test_segmentation(series, tmp_path):
    vol = series["volume"]
    mask = np.zeros(vol.shape, dtype=bool)
    mask[3:8, 20:52, 60:92] = True  # a box around the point
    sources = _sources(vol)
    path = write_segmentation(vol, mask, "32 mm crop at p1", tmp_path / "seg.dcm")
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert ds.SegmentationType == "BINARY"
    _check_references(ds, sources)
    _research(ds)
    seg = hd.seg.segread(path)
    assert seg.SegmentSequence[0].SegmentLabel == "32 mm crop at p1"
    got = seg.get_volume(combine_segments=True).array > 0
    assert got.shape == mask.shape and got.sum() == mask.sum()
    # every segmented pixel, through the frames' positions, lands on the box's voxels of the scan grid
    frames = ds.pixel_array
    placed = np.zeros(vol.shape, dtype=bool)
    for f, r, c in np.argwhere(frames):
        zyx = vol.world_to_index(_frame_world(ds, int(f), int(r), int(c)))
        np.testing.assert_allclose(zyx, np.rint(zyx), atol=1e-3)
        placed[tuple(np.rint(zyx).astype(int))] = True
    np.testing.assert_array_equal(placed, mask)


POINTS = [
    {"point_id": "p1", "position_mm": [-150.25, -180.5, -5.0],
     "predictions": {"malignancy": 0.8125, "spiculation": 3.25, "diameter_mm": 14.5},
     "spread": {"malignancy": 0.0625, "spiculation": None, "diameter_mm": 1.5},
     "trust_percentile": 97.5, "trust_flag": False},
    {"point_id": "p2", "position_mm": [-140.0, -170.0, 7.5],
     "predictions": {"malignancy": 0.125}, "spread": None, "trust_percentile": 99.75, "trust_flag": True},
]


def _items(seq, name_value):
    return [it for it in seq if it.ConceptNameCodeSequence[0].CodeValue == name_value]


def test_structured_report(series, tmp_path):
    vol = series["volume"]
    sources = _sources(vol)
    points = json.loads(json.dumps(POINTS))
    path = write_structured_report(sources, points, tmp_path / "sr.dcm")
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert ds.StudyInstanceUID == sources[0].StudyInstanceUID
    assert ds.SeriesInstanceUID != sources[0].SeriesInstanceUID
    evidence = {r.ReferencedSOPInstanceUID for item in ds.CurrentRequestedProcedureEvidenceSequence
                for s in item.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
    assert evidence == {s.SOPInstanceUID for s in sources}
    assert RESEARCH_USE in ds.SeriesDescription and ds.ContentQualification == "RESEARCH"
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"

    sr = hd.sr.srread(path)
    groups = sr.content.get_planar_roi_measurement_groups()
    assert [str(g.tracking_identifier) for g in groups] == ["p1", "p2"]
    for point, group in zip(points, groups, strict=True):
        region = group.roi
        assert region.GraphicType == "POINT"
        assert region.ReferencedFrameOfReferenceUID == sources[0].FrameOfReferenceUID
        np.testing.assert_allclose(region.value[0], point["position_mm"], atol=1e-4)
        got = {}
        for m in group.get_measurements():
            deriv = m.derivation.meaning if m.derivation is not None else None
            got[(m.name.value, m.name.meaning, deriv)] = (m.value, m.unit.value)
        want = {}
        spread = point["spread"] or {}
        for name, value in point["predictions"].items():
            sd = spread.get(name)
            unit = "mm" if name.endswith("_mm") else "1"
            want[(name[:16].upper(), name, "Mean" if sd is not None else None)] = (value, unit)
            if sd is not None:
                want[(name[:16].upper(), name, "Standard Deviation")] = (sd, unit)
        want[("TRUSTPCT", "Trust percentile", None)] = (point["trust_percentile"], "%")
        assert got == want  # numeric values equal the JSON's
        evaluations = {e.name.value: e.value.meaning for e in group.get_qualitative_evaluations()}
        assert evaluations["INTENDEDUSE"] == RESEARCH_USE
        assert evaluations["TRUSTFLAG"] == ("unlike the training data" if point["trust_flag"]
                                            else "like the training data")
    observer = sr.content.get_observer_contexts()[0]
    assert RESEARCH_USE in observer.observer_identifying_attributes.name


def test_structured_report_refuses_nan(series, tmp_path):
    bad = [{**POINTS[1], "predictions": {"malignancy": float("nan")}}]
    with pytest.raises(ValueError, match="finite"):
        write_structured_report(series["volume"], bad, tmp_path / "bad.dcm")


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian's dicom3tools) is not installed")
def test_outputs_pass_the_dicom3tools_validator(series, tmp_path):
    """David Clunie's dciodvfy checks each object against its IOD: no errors (warnings about the private coding
    scheme 99LIDCCDAM and the source's missing study date are expected)."""
    vol = series["volume"]
    cdam = np.zeros(vol.shape, np.float32)
    cdam[PEAK] = 2.0
    mask = cdam > 0
    from lidc_cdam.ct.point import crop_at_point

    crop = crop_at_point(vol, vol.index_to_world(np.array(PEAK, dtype=float))).crop  # the crop's own 1 mm grid
    on_crop = np.zeros((32, 32, 32), np.float32)
    on_crop[16, 16, 16] = 2.0
    written = [write_parametric_map(vol, cdam, "malignancy", tmp_path / "pm.dcm"),
               write_segmentation(vol, mask, "explained region", tmp_path / "seg.dcm"),
               write_structured_report(_sources(vol), json.loads(json.dumps(POINTS)), tmp_path / "sr.dcm"),
               write_parametric_map(vol, on_crop, "malignancy", tmp_path / "pm_crop.dcm", crop=crop),
               write_segmentation(vol, on_crop > 0, "explained region", tmp_path / "seg_crop.dcm", crop=crop)]
    iods = ["ParametricMap", "Segmentation", "Comprehensive3DSR", "ParametricMap", "Segmentation"]
    for path, iod in zip(written, iods, strict=True):
        done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
        report = done.stdout + done.stderr
        assert iod in report.splitlines(), report  # it recognised the object's IOD
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"


def test_structured_report_carries_the_training_data_as_text(series, tmp_path):
    from lidc_cdam.models.provenance import PHANTOM_WARNING

    text = f"trained on synthetic phantoms (fold 0 of tiny-phantom-malignancy); {PHANTOM_WARNING}"
    path = write_structured_report(_sources(series["volume"]), json.loads(json.dumps(POINTS)), tmp_path / "sr.dcm",
                                   training_data=text)
    sr = hd.sr.srread(path)
    assert len(sr.content.get_planar_roi_measurement_groups()) == 2  # the measurements are unchanged
    items = _items(pydicom.dcmread(path).ContentSequence, "TRAININGDATA")
    assert len(items) == 1 and items[0].ValueType == "TEXT" and items[0].TextValue == text
    plain = write_structured_report(_sources(series["volume"]), json.loads(json.dumps(POINTS)), tmp_path / "plain.dcm")
    assert not _items(pydicom.dcmread(plain).ContentSequence, "TRAININGDATA")
