"""The viewer's Qt-free core: reading scans, the synthetic sample, 2.5D maps, placing them on the CT grid,
the cache and NIfTI export (no napari needed)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from lidc_cdam.viewer import maps as M
from lidc_cdam.viewer.synthetic import NODULES, ORIGIN, SHAPE, SPACING, synthetic_scan
from lidc_cdam.viewer.testing import BIOMARKERS, STATS, digits_checkpoint, synthetic, tiny_checkpoint
from lidc_cdam.viewer.volume import CTVolume, ViewerError, read_dicom_folder, window_limits


@pytest.fixture(scope="module")
def scan():
    return read_dicom_folder(synthetic()["dicom"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("models") / "malignancy.pt")


@pytest.fixture(scope="module")
def biomarker_checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("models") / "biomarkers.pt", task="biomarkers")


@pytest.mark.slow
def test_core_imports_no_gui_toolkit():
    code = ("import sys; import lidc_cdam.viewer, lidc_cdam.viewer.maps, lidc_cdam.viewer.volume, "
            "lidc_cdam.viewer.synthetic; bad = [m for m in ('napari', 'PyQt6', 'qtpy', 'magicgui', 'vispy') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


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
    with pytest.raises(ViewerError, match=r"no DICOM files here|no such file"):
        read_dicom_folder(folder)


def test_reader_refuses_a_whole_download(tmp_path):
    for k in range(21):
        (tmp_path / f"series{k:02d}").mkdir()
        (tmp_path / f"series{k:02d}" / "1.dcm").write_bytes(b"x")
    with pytest.raises(ViewerError, match="more than 20 folders"):
        read_dicom_folder(tmp_path)


def test_triton_blocker_only_blocks_triton():
    from lidc_cdam.viewer._guard import _BlockTriton

    for name in ("triton", "triton.backends"):
        with pytest.raises(ModuleNotFoundError, match="blocked"):
            _BlockTriton.find_spec(name)
    assert _BlockTriton.find_spec("tritonish") is None and _BlockTriton.find_spec("numpy") is None


def test_window_presets():
    assert window_limits("lung") == (-1350.0, 150.0)
    assert window_limits("mediastinum") == (-160.0, 240.0)


def test_nodule_list_matches_the_scan(scan, tmp_path):
    nodules = M.list_nodules(synthetic()["crops_dir"], scan)
    assert [n.nodule_id for n in nodules] == [n.nodule_id for n in NODULES]
    for ref, nod in zip(nodules, NODULES, strict=True):
        assert np.linalg.norm(ref.centre_world - np.array(nod.centre_mm)) < 3.0
        assert M.nodule_at(nodules, np.array(nod.centre_mm) + 2.0) is ref
    assert M.nodule_at(nodules, np.array([0.0, 0.0, 0.0])) is None
    other = CTVolume(scan.hu[:-1], scan.spacing, scan.origin)  # another grid: no nodule matches
    assert M.list_nodules(synthetic()["crops_dir"], other) == []
    with pytest.raises(ViewerError, match=r"no nodules\.csv"):
        M.list_nodules(tmp_path, scan)


@pytest.mark.slow
def test_model_inputs_are_the_training_transforms(scan):
    from lidc_cdam.data.lidc.datasets import Stats, transforms

    crop_path = M.list_nodules(synthetic()["crops_dir"], scan)[1].crop_path
    crop = M.read_crop(crop_path)
    stats = Stats(-650.0, 280.0, np.zeros(8), np.ones(8))
    for view in M.VIEWS:
        for size in (32, 224):
            ref = transforms(stats, view=view, size=size)({"image": str(crop_path)})["image"]
            mine = M.model_inputs(crop["image"], view, [16], {"mean": -650.0, "std": 280.0}, size)[0]
            np.testing.assert_allclose(mine.numpy(), ref.numpy(), atol=1e-5)


def test_slices_through_the_nodule():
    mask = np.zeros((32, 32, 32), dtype=np.uint8)
    mask[12:20, 14:18, 15:17] = 1
    assert M.slices_for(mask, "axial") == list(range(9, 23))
    assert M.slices_for(mask, "coronal", margin=1) == list(range(13, 19))
    assert M.slices_for(mask, "sagittal", margin=0) == [15, 16]
    assert M.slices_for(mask, "axial", "all") == list(range(32))
    assert M.slices_for(np.zeros_like(mask), "axial", margin=2) == [14, 15, 16, 17, 18]


def test_maps_are_per_slice_and_placed_on_the_nodule(scan, checkpoint):
    nodule = M.list_nodules(synthetic()["crops_dir"], scan)[1]
    crop = M.read_crop(nodule.crop_path)
    seen = []
    req = M.MapRequest(str(checkpoint), str(nodule.crop_path), ("malignancy",), "cdam", "axial", "nodule")
    result = M.compute_maps(req, progress=lambda d, t: seen.append((d, t)))
    assert result.maps.shape == (1, 32, 32, 32) and result.signed
    assert seen[0] == (0, len(result.slices)) and seen[-1] == (len(result.slices), len(result.slices))
    explained = np.flatnonzero(np.abs(result.maps[0]).sum(axis=(1, 2)))
    assert set(explained) <= set(result.slices) and len(explained) == len(result.slices)
    assert (result.maps[0] > 0).any() and (result.maps[0] < 0).any()
    assert 0.0 < result.predictions["malignancy"] < 1.0
    # the map of slice 16 is the single-image CDAM of the model input, upsampled to the crop plane
    import torch.nn.functional as F

    from lidc_cdam.explain import explain

    loaded = M.load_checked_model(checkpoint)
    x = M.model_inputs(crop["image"], "axial", [16], STATS, 32)
    ref = F.interpolate(explain(loaded.model, x, targets=["malignant"]).maps, size=(32, 32), mode="bilinear",
                        align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(result.maps[0][16], ref, rtol=1e-4, atol=1e-7)

    placed = M.place_on_scan(result.maps[0], crop, scan)
    assert placed.shape == scan.shape and placed.dtype == np.float32
    nz = np.argwhere(placed != 0)
    lo, hi = scan.world_to_index(nodule.centre_world) - 16.5 / np.array(scan.scale), \
        scan.world_to_index(nodule.centre_world) + 16.5 / np.array(scan.scale)
    assert (nz.min(0) >= np.floor(lo)).all() and (nz.max(0) <= np.ceil(hi)).all()  # inside the crop's block
    _, masks = synthetic_scan()
    on_nodule = masks[1] & (placed != 0)
    assert on_nodule.sum() > 0.5 * masks[1].sum()  # the nodule is covered by the overlay
    # the central slice through the nodule: scan values equal the crop map where grids coincide
    centre = np.round(scan.world_to_index(M.crop_centre_world(crop))).astype(int)
    assert np.isclose(np.abs(placed[centre[0]]).max(), np.abs(placed).max(), rtol=0.5)


def test_consensus_contours_on_the_scan_grid(scan):
    nodules = M.list_nodules(synthetic()["crops_dir"], scan)
    labels = M.nodule_labels(nodules, scan)
    _, masks = synthetic_scan()
    for k, mask in enumerate(masks, start=1):
        inter = ((labels == k) & mask).sum()
        assert inter / mask.sum() > 0.9 and inter / (labels == k).sum() > 0.9


def test_targets_views_methods_and_biomarker_units(scan, biomarker_checkpoint):
    nodule = M.list_nodules(synthetic()["crops_dir"], scan)[0]
    for method, view in (("attention", "coronal"), ("smooth-cdam", "sagittal"), ("integrated-cdam", "coronal")):
        req = M.MapRequest(str(biomarker_checkpoint), str(nodule.crop_path), ("spiculation", "diameter_mm"),
                           method, view, "nodule", n=4)
        result = M.compute_maps(req)
        assert result.maps.shape == (2, 32, 32, 32)
        assert result.signed == (method != "attention")
        if method == "attention":
            assert (result.maps >= 0).all()
            np.testing.assert_array_equal(result.maps[0], result.maps[1])  # class-agnostic
        else:
            assert not np.array_equal(result.maps[0], result.maps[1])
    assert list(result.predictions) == BIOMARKERS  # every output of the model is shown
    # outputs are standardised: shown as output * std + mean
    loaded = M.load_checked_model(biomarker_checkpoint)
    raw = np.zeros(8)
    raw[7] = 1.0
    assert M.predictions(loaded, raw)["diameter_mm"] == pytest.approx(15.0)
    with pytest.raises(ViewerError, match="explains"):
        M.compute_maps(M.MapRequest(str(biomarker_checkpoint), str(nodule.crop_path), ("malignancy",)))


def test_a_checkpoint_for_another_task_is_refused(tmp_path):
    with pytest.raises(ViewerError, match="a checkpoint for another task"):
        M.load_checked_model(digits_checkpoint(tmp_path / "digits.pt"))
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ViewerError, match="not a readable PyTorch checkpoint"):
        M.load_checked_model(tmp_path / "garbage.pt")
    with pytest.raises(ViewerError, match="no such checkpoint"):
        M.load_checked_model(tmp_path / "missing.pt")


def test_cache_memory_and_disk(scan, checkpoint, tmp_path):
    nodule = M.list_nodules(synthetic()["crops_dir"], scan)[2]
    req = M.MapRequest(str(checkpoint), str(nodule.crop_path), ("malignancy",), "cdam", "sagittal", "all")
    cache = M.MapCache(tmp_path / "cache")
    first = M.cached_compute(req, cache)
    again = M.cached_compute(req, cache)
    assert not first.cached and again.cached
    from_disk = M.cached_compute(req, M.MapCache(tmp_path / "cache"))
    assert from_disk.cached and from_disk.slices == first.slices and from_disk.predictions == first.predictions
    np.testing.assert_array_equal(from_disk.maps, first.maps)
    other = M.cached_compute(M.MapRequest(**{**req.__dict__, "view": "axial"}), cache)
    assert not other.cached


def test_nifti_export_is_aligned_with_the_scan(scan, checkpoint, tmp_path):
    import SimpleITK as sitk

    nodule = M.list_nodules(synthetic()["crops_dir"], scan)[0]
    result = M.compute_maps(M.MapRequest(str(checkpoint), str(nodule.crop_path), ("malignancy",)))
    placed = M.place_on_scan(result.maps[0], M.read_crop(nodule.crop_path), scan)
    path = M.export_nifti(placed, scan, tmp_path / "map.nii.gz")
    img = sitk.ReadImage(str(path))
    reader = sitk.ImageSeriesReader()
    ct = sitk.ReadImage(reader.GetGDCMSeriesFileNames(str(synthetic()["dicom"])))
    assert img.GetSize() == ct.GetSize()
    np.testing.assert_allclose(img.GetSpacing(), ct.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(img.GetOrigin(), ct.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(img.GetDirection(), ct.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), placed)


@pytest.mark.slow
def test_lidc_scan_through_pylidc_lines_up_with_its_crops(tmp_path):
    """A synthetic series with a real LIDC scan's geometry: read through pylidc with its consensus contours,
    the same series through the DICOM reader, and the preprocessed crops placed back on it."""
    from lidc_cdam.viewer.volume import read_lidc_scan
    from lidc_helpers import copy_root

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
    nodules = M.list_nodules(tmp_path / "pre", plain)
    assert [n.nodule_id for n in nodules] == vol.meta["label_names"]
    placed = M.nodule_labels(nodules, plain)
    inter = ((placed > 0) & (labels > 0)).sum()
    assert inter / (labels > 0).sum() > 0.7
