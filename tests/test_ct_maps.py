"""A nodule's 2.5D maps with :mod:`lidc_cdam.ct`: the nodule list of a scan, checked checkpoints, model inputs
as the training transforms build them, maps per slice and target, placing them on the CT grid, the consensus
contours, the cache and NIfTI export (no napari needed)."""

from __future__ import annotations

import numpy as np
import pytest

import lidc_cdam.ct as M
from lidc_cdam.ct.synthetic import NODULES, synthetic_scan
from lidc_cdam.ct.testing import BIOMARKERS, STATS, digits_checkpoint, synthetic, tiny_checkpoint
from lidc_cdam.ct.volume import CTVolume, read_dicom_folder


@pytest.fixture(scope="module")
def scan():
    return read_dicom_folder(synthetic()["dicom"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("models") / "malignancy.pt")


@pytest.fixture(scope="module")
def biomarker_checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("models") / "biomarkers.pt", task="biomarkers")


def test_nodule_list_matches_the_scan(scan, tmp_path):
    nodules = M.list_nodules(synthetic()["crops_dir"], scan)
    assert [n.nodule_id for n in nodules] == [n.nodule_id for n in NODULES]
    for ref, nod in zip(nodules, NODULES, strict=True):
        assert np.linalg.norm(ref.centre_world - np.array(nod.centre_mm)) < 3.0
        assert M.nodule_at(nodules, np.array(nod.centre_mm) + 2.0) is ref
    assert M.nodule_at(nodules, np.array([0.0, 0.0, 0.0])) is None
    other = CTVolume(scan.hu[:-1], scan.spacing, scan.origin)  # another grid: no nodule matches
    assert M.list_nodules(synthetic()["crops_dir"], other) == []
    with pytest.raises(M.CTError, match=r"no nodules\.csv"):
        M.list_nodules(tmp_path, scan)


@pytest.mark.slow
def test_model_inputs_are_the_training_transforms(scan):
    from lidc_cdam.data.lidc import datasets
    from lidc_cdam.data.lidc.datasets import Stats, transforms

    assert M.VIEWS == datasets.VIEWS and M.CENTRE == datasets.CENTRE  # lidc_cdam.ct.inputs keeps MONAI out
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
    with pytest.raises(M.CTError, match="explains"):
        M.compute_maps(M.MapRequest(str(biomarker_checkpoint), str(nodule.crop_path), ("malignancy",)))


def test_a_checkpoint_for_another_task_is_refused(tmp_path):
    with pytest.raises(M.CTError, match="a checkpoint for another task"):
        M.load_checked_model(digits_checkpoint(tmp_path / "digits.pt"))
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(M.CTError, match="not a readable PyTorch checkpoint"):
        M.load_checked_model(tmp_path / "garbage.pt")
    with pytest.raises(M.CTError, match="no such checkpoint"):
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
