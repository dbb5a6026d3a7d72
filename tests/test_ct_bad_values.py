"""Bad values in a DICOM series: refused (rescale, geometry), masked (NaN / inf voxels), warned about
(implausible HU), or resolved the same whatever the file names (two images at one slice position)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from test_ct_reading import STEP, N, _source, write_series

from lidc_cdam.ct import CTVolume, SeriesRefused, read_ct
from lidc_cdam.ct.values import INVALID_HU, set_warnings, to_hu, value_warnings

pytestmark = pytest.mark.filterwarnings("ignore:The value length:UserWarning",
                                        "ignore:Invalid value for VR DS:UserWarning")


def _edit(folder: Path, k: int, **attrs) -> Path:
    """Set ``attrs`` on the ``k``-th file of ``folder`` (by name); returns the file."""
    path = sorted(folder.glob("*.dcm"))[k]
    ds = pydicom.dcmread(path)
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("attrs, reason, pattern", [
    ({"RescaleSlope": 0}, "bad_rescale", r"RescaleSlope is 0: it must be a finite number > 0"),
    ({"RescaleSlope": -1}, "bad_rescale", r"RescaleSlope is -1"),
    ({"RescaleSlope": "nan"}, "bad_rescale", r"RescaleSlope is nan"),
    ({"RescaleIntercept": "inf"}, "bad_rescale", r"RescaleIntercept is inf: not a finite number"),
    ({"PixelSpacing": [0, 0.66]}, "bad_geometry", r"PixelSpacing is \[0\.0, 0\.66\]: a pixel spacing must be > 0"),
    ({"PixelSpacing": ["nan", 0.66]}, "bad_geometry", r"PixelSpacing is \[nan, 0\.66\]: not 2 finite numbers"),
    ({"ImagePositionPatient": [0, "nan", 0]}, "bad_geometry", r"ImagePositionPatient is \[0\.0, nan, 0\.0\]"),
    ({"ImageOrientationPatient": [1, 0, 0, 0, "inf", 0]}, "bad_geometry", r"ImageOrientationPatient is .*inf"),
])
def test_bad_rescale_and_geometry_are_refused_naming_the_file(tmp_path, attrs, reason, pattern):
    write_series(tmp_path / "s", vary=False)
    victim = _edit(tmp_path / "s", 4, **attrs)
    with pytest.raises(SeriesRefused, match=pattern) as err:
        read_ct(tmp_path / "s")
    assert err.value.reason == reason and str(victim) in str(err.value)


def _multiframe(path: Path, slope: float) -> None:
    src = _source("CT_small.dcm")
    ds = copy.deepcopy(src)
    ipp0 = np.array([float(v) for v in src.ImagePositionPatient])
    for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        del ds[key]
    ds.NumberOfFrames = N
    ds.PixelData = np.stack([src.pixel_array] * N).tobytes()
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([Dataset()])
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = list(src.ImageOrientationPatient)
    shared.PixelMeasuresSequence = Sequence([Dataset()])
    shared.PixelMeasuresSequence[0].PixelSpacing = list(src.PixelSpacing)
    shared.PixelValueTransformationSequence = Sequence([Dataset()])
    shared.PixelValueTransformationSequence[0].RescaleSlope = slope
    shared.PixelValueTransformationSequence[0].RescaleIntercept = -1024
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k in range(N):
        fr = Dataset()
        fr.PlanePositionSequence = Sequence([Dataset()])
        fr.PlanePositionSequence[0].ImagePositionPatient = list(ipp0 + np.array([0.0, 0.0, STEP * k]))
        frames.append(fr)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.save_as(path, enforce_file_format=True)


def test_enhanced_multiframe_slope_zero_is_refused(tmp_path):
    _multiframe(tmp_path / "ok.dcm", 1)
    assert read_ct(tmp_path / "ok.dcm").shape[0] == N
    _multiframe(tmp_path / "zero.dcm", 0)
    with pytest.raises(SeriesRefused, match=r"zero\.dcm: RescaleSlope \(frame 1\) is 0") as err:
        read_ct(tmp_path / "zero.dcm")
    assert err.value.reason == "bad_rescale"


def _with_duplicates(folder: Path) -> dict:
    """A series plus, at the positions of slices 2 and 5, images with other values: slice 2's copy has a higher
    InstanceNumber (kept), slice 5's a lower one (dropped); a third image at slice 5 ties on InstanceNumber with
    the original and is acquired later (kept)."""
    truth = write_series(folder, vary=False)
    files = {int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber): p for p in folder.glob("*.dcm")}
    expected = truth["hu"].copy()
    for k, instance, acquired, delta, kept in ((2, 99, "120000", 7, True), (5, 0, "120000", 11, False),
                                               (5, 6, "130000", 13, True)):
        ds = pydicom.dcmread(files[k + 1])
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber, ds.AcquisitionTime = instance, acquired
        ds.PixelData = (ds.pixel_array + delta).astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(folder / f"dup{k}_{instance}.dcm", enforce_file_format=True)
        if kept:
            expected[k] = truth["hu"][k] + delta
    for p in folder.glob("*.dcm"):  # the originals carry no acquisition time: an explicit one is later
        ds = pydicom.dcmread(p)
        if "AcquisitionTime" in ds and not p.name.startswith("dup"):
            del ds.AcquisitionTime
            ds.save_as(p, enforce_file_format=True)
    return {"hu": expected}


def test_duplicate_positions_resolved_by_attributes_not_file_names(tmp_path):
    truth = _with_duplicates(tmp_path / "a")
    vol = read_ct(tmp_path / "a")
    np.testing.assert_array_equal(vol.hu, truth["hu"])
    assert vol.shape[0] == N and len(vol.meta["sop_instance_uids"]) == N
    (warning,) = [w for w in vol.meta["warnings"] if "already seen slice position" in w]
    assert warning.startswith("3 image(s)") and "highest InstanceNumber" in warning
    assert "dup5_0.dcm" in warning and "dup2_99.dcm" not in warning and "dup5_6.dcm" not in warning
    assert vol.meta["warning"] == "; ".join(vol.meta["warnings"])

    # the same files under permuted names: the same volume
    files = sorted((tmp_path / "a").glob("*.dcm"))
    rng = np.random.default_rng(0)
    for seed, folder in enumerate((tmp_path / "b", tmp_path / "c")):
        folder.mkdir()
        names = [f"x{n:03d}.dcm" for n in rng.permutation(len(files))]
        for f, name in zip(files, names, strict=True):
            shutil.copy(f, folder / name)
        other = read_ct(folder)
        np.testing.assert_array_equal(other.hu, vol.hu, err_msg=f"permutation {seed}")
        assert other.meta["sop_instance_uids"] == vol.meta["sop_instance_uids"]
        assert other.origin == pytest.approx(vol.origin)


def test_float_pixel_data_nan_and_inf_are_masked(tmp_path):
    write_series(tmp_path / "s", vary=False)
    victim = sorted((tmp_path / "s").glob("*.dcm"))[0]
    ds = pydicom.dcmread(victim)
    k = int(ds.InstanceNumber) - 1
    arr = ds.pixel_array.astype(np.float32)
    arr[3, 4], arr[10, 20], arr[30, 40] = np.nan, np.inf, -np.inf
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = 32
    ds.FloatPixelData = arr.tobytes()
    ds.save_as(victim, enforce_file_format=True)
    vol = read_ct(tmp_path / "s")
    assert vol.invalid is not None and vol.invalid.shape == vol.shape and int(vol.invalid.sum()) == 3
    assert vol.invalid[k, 3, 4] and vol.invalid[k, 10, 20] and vol.invalid[k, 30, 40]
    assert vol.hu[k, 3, 4] == INVALID_HU
    assert any(w.startswith("3 voxel(s) NaN or infinite") for w in vol.meta["warnings"])


def test_finite_series_has_no_mask_and_a_warning_list(tmp_path):
    write_series(tmp_path / "s")
    vol = read_ct(tmp_path / "s")
    assert vol.invalid is None and isinstance(vol.meta["warnings"], list)


def test_values_rules():
    hu, invalid, clipped = to_hu(np.array([[[0.0, np.nan, 1e6, -np.inf]]]))
    assert hu.tolist() == [[[0, INVALID_HU, 32767, INVALID_HU]]] and invalid.sum() == 2 and clipped == 1
    air = np.full((8, 10, 10), -2000, np.int16)
    assert any("below -1100 HU" in w for w in value_warnings(air))
    metal = np.zeros((8, 10, 10), np.int16)
    metal[0, :2] = 5000  # 2.5 % of the voxels
    assert any("above 4000 HU" in w for w in value_warnings(metal))
    metal[0, :2] = 3000
    assert not value_warnings(metal) and value_warnings(metal, expect_air=True)
    meta = set_warnings({"warning": "stale"}, [])
    assert meta == {"warnings": []}
    with pytest.raises(ValueError, match="not on the scan's grid"):
        CTVolume(air, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), invalid=np.zeros((2, 2, 2), bool))
