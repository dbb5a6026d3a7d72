"""Synthetic DICOM (real scans' geometry) -> pylidc's real loading path -> crops; bad input; resume."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lidc_helpers import (
    PATIENTS,
    copy_root,
    crops_equal,
    first_scan,
    series_files,
    synthetic_root,
    write_foreign_series,
)

from lidc_cdam.data.lidc.crops import read_crop
from lidc_cdam.data.lidc.errors import LidcError
from lidc_cdam.data.lidc.preprocess import preprocess

pytestmark = pytest.mark.slow  # synthetic series take a few seconds to write and read

REPO = Path(__file__).resolve().parents[1]


@functools.cache
def reference_run() -> Path:
    """An uninterrupted run over the intact synthetic root (one process)."""
    out = Path(tempfile.mkdtemp(prefix="lidc-pre-ref-"))
    preprocess(synthetic_root(), out, workers=1, progress=False)
    return out


def test_synthetic_series_has_the_tags_pylidc_and_simpleitk_read():
    import pydicom
    import SimpleITK as sitk

    scan = first_scan(PATIENTS[0])
    files = series_files(synthetic_root(), PATIENTS[0])
    assert len(files) == len(scan.slice_zvals) == 87
    ds = pydicom.dcmread(files[0])
    assert ds.Rows == ds.Columns == 512 and ds.PatientID == scan.patient_id
    assert ds.SeriesInstanceUID == scan.series_instance_uid and ds.StudyInstanceUID == scan.study_instance_uid
    zs = sorted(float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files)
    np.testing.assert_allclose(zs, scan.slice_zvals, atol=1e-4)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(files[0].parent)))
    image = reader.Execute()
    assert image.GetSize() == (512, 512, 87)
    np.testing.assert_allclose(image.GetSpacing(), (scan.pixel_spacing, scan.pixel_spacing, scan.slice_spacing))
    # pylidc's own loader finds the series (TCIA layout: recursive search) and reads the volume
    from lidc_cdam.data.lidc.pylidc_compat import set_dicom_root

    set_dicom_root(synthetic_root())
    vol = scan.to_volume(verbose=False)
    assert vol.shape == (512, 512, 87) and vol.min() == -1000


def test_crops_from_synthetic_dicom():
    out = reference_run()
    table = pd.read_csv(out / "nodules.csv")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nodules"] == len(table) == 5 and summary["scans"] == 3 and summary["nodules_skipped"] == 0
    assert sorted(table["patient_id"].unique()) == sorted(PATIENTS)
    assert pd.read_csv(out / "skips.csv").empty
    committed = pd.read_csv(REPO / "data_manifest" / "lidc_nodules.csv").set_index("nodule_id")
    for _, row in table.iterrows():
        assert row["label"] == committed.loc[row["nodule_id"], "label"]
        c = read_crop(out / row["crop_path"])
        assert c["image"].shape == c["mask"].shape == (32, 32, 32) and c["image"].dtype == np.int16
        assert c["image"].min() >= -1000 and c["image"].max() <= 400
        np.testing.assert_allclose(c["spacing"], 1.0)
        assert c["source"] == "ct" and c["axes"] == "zyx"
        idx = np.argwhere(c["mask"])
        assert len(idx) > 0
        assert np.abs(idx.mean(0) - 15.5).max() < 4, "the nodule is at the centre"
        assert abs(int(c["mask"].sum()) - row["consensus_volume_mm3"]) < 0.35 * row["consensus_volume_mm3"] + 30
        assert c["image"][c["mask"] > 0].mean() > -700, "the rendered nodule is denser than the lung (-850 HU)"
        # crop index -> scan index: the crop's centre lands on the box centre, mask voxels in the bbox
        ijk = (c["crop_to_scan_ijk"] @ np.c_[idx, np.ones(len(idx))].T).T[:, :3]
        centre = (c["crop_to_scan_ijk"] @ [15.5, 15.5, 15.5, 1])[:3]
        mm_per_ijk = np.array([c["scan_spacing"][1], c["scan_spacing"][0], c["scan_spacing"][2]])
        assert (np.abs(centre - c["centre_ijk"]) * mm_per_ijk <= 0.5 + 1e-6).all(), "within half a 1 mm voxel"
        lo = np.array([row["bbox_i0"], row["bbox_j0"], row["bbox_k0"]]) - 1.5
        hi = np.array([row["bbox_i1"], row["bbox_j1"], row["bbox_k1"]]) + 0.5
        assert ((ijk >= lo) & (ijk <= hi)).all()
        # crop index -> world agrees with the resampled grid's position
        world = c["crop_to_world"] @ [0, 0, 0, 1]
        np.testing.assert_allclose(world[:3], c["origin"])
        np.testing.assert_allclose(c["scan_origin"] + c["start_resampled"][::-1], c["origin"], atol=1e-6)


def test_bad_input_is_skipped_with_reasons_and_the_rest_is_unaffected(tmp_path):
    root = copy_root(tmp_path)
    files_0957, files_0719 = series_files(root, "LIDC-IDRI-0957"), series_files(root, "LIDC-IDRI-0719")
    files_0957[len(files_0957) // 2].unlink()  # a missing slice
    files_0719[3].write_bytes(b"this is not a DICOM file" * 10)  # a corrupt file
    write_foreign_series(root)  # a series not in the database
    out = tmp_path / "out"
    summary = preprocess(root, out, workers=2, progress=False)
    skips = pd.read_csv(out / "skips.csv")
    by_patient = skips.groupby("patient_id")["reason"].agg(set).to_dict()
    assert by_patient == {"LIDC-IDRI-0957": {"missing_slice"}, "LIDC-IDRI-0719": {"corrupt_file"},
                          "LIDC-IDRI-9999": {"not_in_database"}}
    detail = skips.set_index("patient_id")["detail"]
    assert "1 of 65 slices missing" in detail["LIDC-IDRI-0957"]
    assert files_0719[3].name in detail["LIDC-IDRI-0719"]
    assert summary["nodules"] == 3 and summary["nodules_skipped"] == 2
    table = pd.read_csv(out / "nodules.csv")
    assert set(table["patient_id"]) == {"LIDC-IDRI-0078"}
    ref = reference_run()
    for name in table["crop_path"]:  # the good scan's crops are the same as in a clean run
        a, b = read_crop(out / name), read_crop(ref / name)
        np.testing.assert_array_equal(a["image"], b["image"])


def test_mixed_series_is_named(tmp_path):
    import pydicom

    root = copy_root(tmp_path, ["LIDC-IDRI-0957"])
    files = series_files(root, "LIDC-IDRI-0957")
    ds = pydicom.dcmread(files[5])
    ds.PixelSpacing = [0.5, 0.5]
    ds.save_as(files[5])
    out = tmp_path / "out"
    preprocess(root, out, workers=1, progress=False)
    skips = pd.read_csv(out / "skips.csv")
    assert skips["reason"].tolist() == ["mixed_series"] and files[5].name in skips["detail"][0]


def test_uneven_spacing_is_named(tmp_path):
    from types import SimpleNamespace

    from lidc_cdam.data.lidc.dicom_series import check_geometry
    from lidc_cdam.data.lidc.errors import SeriesError

    zs = [0.0, 2.5, 5.0, 10.0, 12.5]  # the database itself has a 5 mm gap

    def image(z):
        return SimpleNamespace(Rows=512, Columns=512, PixelSpacing=[0.7, 0.7], ImagePositionPatient=[0, 0, z],
                               ImageOrientationPatient=[1, 0, 0, 0, 1, 0], filename=f"{z}.dcm")

    with pytest.raises(SeriesError, match=r"gap of 5\.000 mm between z = 5\.00 and 10\.00") as info:
        check_geometry(SimpleNamespace(slice_zvals=zs), [image(z) for z in zs], str(tmp_path))
    assert info.value.reason == "uneven_spacing"


def test_not_lidc_folders_fail_with_a_clear_message(tmp_path, capsys):
    from lidc_cdam.pipelines.cli import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    with pytest.raises(LidcError, match="no DICOM files"):
        preprocess(tmp_path / "empty", tmp_path / "out", progress=False)
    foreign = tmp_path / "foreign"
    write_foreign_series(foreign)
    assert main(["preprocess", "--lidc-root", str(foreign), "--out", str(tmp_path / "out2"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "none of the 1 DICOM series" in err and "LIDC-IDRI" in err
    assert main(["preprocess", "--lidc-root", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2


def _compare_runs(a: Path, b: Path) -> None:
    for name in ("nodules.csv", "skips.csv"):
        assert (a / name).read_text() == (b / name).read_text(), name
    assert json.loads((a / "summary.json").read_text()) == json.loads((b / "summary.json").read_text())
    crops_equal(a, b)


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    out = tmp_path / "out"
    done = []

    def interrupt(record):
        done.append(record["patient_id"])
        raise KeyboardInterrupt  # as if killed right after the first scan finished

    with pytest.raises(KeyboardInterrupt):
        preprocess(synthetic_root(), out, workers=1, progress=False, on_result=interrupt)
    assert len(list((out / "scans").glob("*.json"))) == 1 and not (out / "nodules.csv").exists()
    first = next((out / "scans").glob("*.json"))
    mtime = first.stat().st_mtime_ns
    (out / "crops" / ".half-written.npz.tmp").write_bytes(b"partial")  # debris of a killed writer
    redone = []
    preprocess(synthetic_root(), out, workers=1, progress=False, on_result=lambda r: redone.append(r["patient_id"]))
    assert first.stat().st_mtime_ns == mtime and sorted(redone + done) == sorted(PATIENTS)
    (out / "crops" / ".half-written.npz.tmp").unlink()
    _compare_runs(out, reference_run())
    # a lost crop file: only its scan is redone
    lost = sorted((out / "crops").glob("LIDC-IDRI-0957*.npz"))[0]
    lost.unlink()
    redone.clear()
    preprocess(synthetic_root(), out, workers=2, progress=False, on_result=lambda r: redone.append(r["patient_id"]))
    assert redone == ["LIDC-IDRI-0957"]
    _compare_runs(out, reference_run())


def test_killed_process_resumes_to_the_same_result(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lidc_cdam.pipelines.cli", "preprocess", "--lidc-root", str(synthetic_root()),
           "--out", str(out), "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if list((out / "scans").glob("*.json")):
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert len(list((out / "scans").glob("*.json"))) < len(PATIENTS), "killed before the end"
    assert not (out / "nodules.csv").exists()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    _compare_runs(out, reference_run())
