"""Reading CT scans (:mod:`lidc_cdam.ct.volume`): a DICOM series in HU with its geometry, an LIDC-IDRI scan
through pylidc, clear errors for folders without a series, window presets (no napari needed)."""

from __future__ import annotations

import numpy as np
import pytest

from lidc_cdam.ct.errors import CTError
from lidc_cdam.ct.nodules import list_nodules
from lidc_cdam.ct.placement import nodule_labels
from lidc_cdam.ct.synthetic import NODULES, ORIGIN, SHAPE, SPACING, synthetic_scan
from lidc_cdam.ct.testing import synthetic
from lidc_cdam.ct.volume import read_dicom_folder, window_limits


@pytest.fixture(scope="module")
def scan():
    return read_dicom_folder(synthetic()["dicom"])


def test_reader_gives_shape_spacing_origin_and_hu(scan):
    assert scan.shape == SHAPE
    assert scan.spacing == pytest.approx(SPACING)
    assert scan.origin == pytest.approx(ORIGIN)
    assert scan.scale == pytest.approx(SPACING[::-1]) and scan.translate == pytest.approx(ORIGIN[::-1])
    assert scan.rotate is None
    truth, masks = synthetic_scan()
    np.testing.assert_array_equal(scan.hu, truth.hu)  # HU exactly (intercept -1024 applied)
    assert scan.hu.dtype == np.int16 and scan.hu.min() == -1000
    assert scan.meta["patient_id"] == "SYNTHETIC-0001" and scan.meta["modality"] == "CT"
    from scipy.ndimage import binary_erosion

    # the nodule voxels hold the phantom's HU, in patient mm where they were put
    for nod, mask in zip(NODULES, masks, strict=True):
        centre_idx = np.round(scan.world_to_index(np.array(nod.centre_mm))).astype(int)
        assert mask[tuple(centre_idx)]
        core = binary_erosion(mask, iterations=2)
        assert abs(float(np.median(scan.hu[core])) - nod.hu) < 30


def test_reader_finds_the_series_below_a_patient_folder(scan):
    above = read_dicom_folder(synthetic()["dicom"].parent)
    assert above.shape == scan.shape


@pytest.mark.parametrize("make", ["empty", "text", "missing"])
def test_reader_says_clearly_when_there_is_no_dicom(tmp_path, make):
    folder = tmp_path / "not-dicom"
    if make != "missing":
        folder.mkdir()
    if make == "text":
        (folder / "notes.txt").write_text("hello")
        (folder / "image.png").write_bytes(b"\x89PNG" + bytes(200))
    with pytest.raises(CTError, match=r"no DICOM files here|no such file"):
        read_dicom_folder(folder)


def test_reader_refuses_a_whole_download(tmp_path):
    for k in range(21):
        (tmp_path / f"series{k:02d}").mkdir()
        (tmp_path / f"series{k:02d}" / "1.dcm").write_bytes(b"x")
    with pytest.raises(CTError, match="more than 20 folders"):
        read_dicom_folder(tmp_path)


def test_window_presets():
    assert window_limits("lung") == (-1350.0, 150.0)
    assert window_limits("mediastinum") == (-160.0, 240.0)


@pytest.mark.slow
def test_lidc_scan_through_pylidc_lines_up_with_its_crops(tmp_path):
    """A synthetic series with a real LIDC scan's geometry: read through pylidc with its consensus contours,
    the same series through the DICOM reader, and the preprocessed crops placed back on it."""
    from lidc_helpers import copy_root

    from lidc_cdam.ct.volume import read_lidc_scan
    from lidc_cdam.data.lidc.preprocess import preprocess

    root = copy_root(tmp_path, patients=("LIDC-IDRI-0957",))
    vol = read_lidc_scan("LIDC-IDRI-0957", root)
    plain = read_dicom_folder(root / "LIDC-IDRI-0957")
    assert vol.shape == plain.shape and vol.shape[1:] == (512, 512)
    np.testing.assert_allclose(vol.spacing, plain.spacing, atol=1e-4)
    np.testing.assert_allclose(vol.origin, plain.origin, atol=1e-3)
    np.testing.assert_array_equal(vol.hu, plain.hu)
    labels = vol.meta["labels"]
    assert labels.shape == vol.shape and labels.max() == len(vol.meta["label_names"]) >= 1
    preprocess(root, tmp_path / "pre", progress=False)
    nodules = list_nodules(tmp_path / "pre", plain)
    assert [n.nodule_id for n in nodules] == vol.meta["label_names"]
    placed = nodule_labels(nodules, plain)
    inter = ((placed > 0) & (labels > 0)).sum()
    assert inter / (labels > 0).sum() > 0.7
