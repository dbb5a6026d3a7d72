"""Explain at a point (:mod:`lidc_cdam.ct.point`) and fold ensembles (:mod:`lidc_cdam.ct.ensemble`) on the
synthetic chest scan with tiny random checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

import lidc_cdam.ct as M
from lidc_cdam.ct.ensemble import combine, explain_crop, group_checkpoints, sign_agreement
from lidc_cdam.ct.maps import crop_steps, drain
from lidc_cdam.ct.point import PointOutside, crop_at_point, explain_point, to_world, volume_extent
from lidc_cdam.ct.testing import synthetic, tiny_checkpoint


@pytest.fixture(scope="module")
def scan():
    return M.read_ct(synthetic()["dicom"])


@pytest.fixture(scope="module")
def nodules(scan):
    return M.list_nodules(synthetic()["crops_dir"], scan)


@pytest.fixture(scope="module")
def folds(tmp_path_factory):
    root = tmp_path_factory.mktemp("folds")
    return [tiny_checkpoint(root / f"malignancy-{s}.pt", seed=s) for s in range(3)]


@pytest.fixture(scope="module")
def biomarker_folds(tmp_path_factory):
    root = tmp_path_factory.mktemp("bfolds")
    return [tiny_checkpoint(root / f"biomarkers-{s}.pt", task="biomarkers", seed=10 + s) for s in range(3)]


def test_point_at_a_nodule_gives_its_crop(scan, nodules):
    for nod in nodules:
        crop = M.read_crop(nod.crop_path)
        by_mm = crop_at_point(scan, M.crop_centre_world(crop))
        np.testing.assert_array_equal(by_mm.image, crop["image"])
        np.testing.assert_allclose(by_mm.crop["crop_to_world"], crop["crop_to_world"], atol=1e-9)
        np.testing.assert_array_equal(by_mm.crop["start_resampled"], crop["start_resampled"])
        assert by_mm.padded_share == 0.0 and not by_mm.padded.any()
        # the consensus centre (the preprocessing's own centre), and the same point as a voxel index (i, j, k)
        centre = scan.geometry().ijk_to_world(crop["centre_ijk"])
        np.testing.assert_array_equal(crop_at_point(scan, centre).image, crop["image"])
        ijk = scan.world_to_index(centre)[::-1]
        by_ijk = crop_at_point(scan, ijk, ijk=True)
        np.testing.assert_array_equal(by_ijk.image, crop["image"])
        np.testing.assert_allclose(by_ijk.point_world, centre, atol=1e-9)


def test_point_maps_equal_the_nodule_path(scan, nodules, folds):
    nod = nodules[1]
    crop = M.read_crop(nod.crop_path)
    ref = M.compute_maps(M.MapRequest(str(folds[0]), str(nod.crop_path), ("malignancy",), slices="all"))
    result = explain_point(scan, M.crop_centre_world(crop), [folds[0]], slices="all")
    (ens,) = result.ensembles
    assert ens.targets == ["malignancy"] and ens.n == 1 and ens.sd == {"malignancy": 0.0}
    np.testing.assert_allclose(ens.mean_maps, ref.maps, rtol=1e-5, atol=1e-7)
    assert ens.mean["malignancy"] == pytest.approx(ref.predictions["malignancy"], rel=1e-6)
    assert (ens.agreement == 1).all()  # an ensemble of one agrees with itself
    placed = result.on_scan(ens.mean_maps[0], scan)
    np.testing.assert_allclose(placed, M.place_on_scan(ref.maps[0], crop, scan), rtol=1e-5, atol=1e-7)
    assert placed.shape == scan.shape and np.abs(placed).max() > 0


def test_point_near_the_edge_is_padded(scan):
    import SimpleITK as sitk

    from lidc_cdam.data.lidc.crops import _resample

    for ijk in [(0, 0, 0), (128, 128, 0), (255, 3, 47)]:
        pc = crop_at_point(scan, ijk, ijk=True)
        assert 0 < pc.padded_share < 1
        assert (pc.image[pc.padded] == -1000).all()
        assert pc.padded_share == pytest.approx(pc.padded.sum() / 32**3)
        # the padded voxels are those SimpleITK's resampling finds outside the scan
        ones = sitk.GetImageFromArray(np.ones(scan.shape, dtype=np.uint8))
        ones.SetSpacing(scan.spacing)
        ones.SetOrigin(scan.origin)
        ones.SetDirection(scan.direction)
        inside = _resample(ones, scan.geometry(), pc.crop["start_resampled"], 32, linear=False, default=0)
        np.testing.assert_array_equal(pc.padded, inside == 0)
    # half the box below the first slice along z: about half of it padded
    pc = crop_at_point(scan, (128, 128, 0), ijk=True)
    assert 0.4 < pc.padded_share < 0.6


def test_point_outside_is_refused(scan):
    lo, hi = volume_extent(scan)
    with pytest.raises(PointOutside, match=r"\(x, y, z\) = \(0\.0, 0\.0, 0\.0\) mm .* outside the volume") as err:
        crop_at_point(scan, (0.0, 0.0, 0.0))
    assert f"z {lo[2]:.1f} .. {hi[2]:.1f} mm" in str(err.value) and err.value.point == (0.0, 0.0, 0.0)
    with pytest.raises(PointOutside, match=r"voxel index \(i, j, k\) = \(10\.0, 20\.0, 48\.0\).*k 0 \.\. 47"):
        to_world(scan, (10, 20, 48), ijk=True)
    with pytest.raises(M.CTError, match="three finite numbers"):
        to_world(scan, (1.0, 2.0))
    np.testing.assert_allclose(to_world(scan, (10, 20, 47.4), ijk=True),
                               scan.index_to_world(np.array([47.4, 20, 10])))


def test_ensemble_equals_numpy_over_the_folds(scan, nodules, folds, biomarker_folds):
    crop = M.read_crop(nodules[0].crop_path)
    groups = group_checkpoints([folds[0], biomarker_folds[0], *folds[1:], *biomarker_folds[1:]])
    assert [len(g) for g in groups.values()] == [3, 3]
    assert list(groups) == [("malignancy",), tuple(M.load_checked_model(biomarker_folds[0]).targets)]
    for models in groups.values():
        ens = explain_crop(models, crop, slices="nodule")
        singles = [drain(crop_steps(m, crop, m.targets, "cdam", "axial", "nodule"), None) for m in models]
        maps = np.stack([s.maps for s in singles]).astype(np.float64)
        mean = maps.mean(0)
        np.testing.assert_allclose(ens.mean_maps, mean, rtol=1e-5, atol=1e-7)
        agree = (np.sign(maps) == np.sign(mean)).mean(0)
        np.testing.assert_allclose(ens.agreement, agree)
        for t in ens.targets:
            values = np.array([s.predictions[t] for s in singles])
            assert ens.mean[t] == pytest.approx(values.mean()) and ens.sd[t] == pytest.approx(values.std())
            assert ens.sd[t] > 0
        assert ens.per_model == [s.predictions for s in singles]
        # agreement is 1 wherever every fold has the mean's sign, below 1 where one differs
        all_agree = (np.sign(maps) == np.sign(mean)).all(0)
        assert (ens.agreement[all_agree] == 1).all() and (ens.agreement[~all_agree] < 1).all()
        assert all_agree.any() and (~all_agree).any()
        assert set(np.unique(ens.agreement)) <= {0.0, 1 / 3, 2 / 3, 1.0} | {np.float32(1 / 3), np.float32(2 / 3)}


def test_ensemble_of_copies_and_mixed_tasks(scan, nodules, folds, biomarker_folds):
    crop = M.read_crop(nodules[2].crop_path)
    same = explain_crop([folds[1]] * 3, crop)
    assert (same.agreement == 1).all() and same.sd["malignancy"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(M.CTError, match="models of one task"):
        explain_crop([folds[0], biomarker_folds[0]], crop)
    with pytest.raises(M.CTError, match="no checkpoint"):
        group_checkpoints([])


def test_combine_and_agreement_by_hand():
    maps = np.array([[1.0, -1.0, 0.0, 2.0], [1.0, 1.0, 0.0, -1.0], [2.0, 1.0, 0.0, -2.0]])
    np.testing.assert_allclose(sign_agreement(maps), [1.0, 2 / 3, 1.0, 2 / 3])

    class R:  # a MapResult's fields that combine reads
        def __init__(self, m, p):
            self.maps, self.predictions, self.targets = m[None], {"malignancy": p}, ["malignancy"]
            self.method, self.view, self.signed = "cdam", "axial", True

    ens = combine([R(m, p) for m, p in zip(maps, (0.2, 0.4, 0.9), strict=True)], ["a", "b", "c"], "malignancy")
    assert ens.mean["malignancy"] == pytest.approx(0.5) and ens.sd["malignancy"] == pytest.approx(np.std([.2, .4, .9]))
    np.testing.assert_allclose(ens.mean_maps[0], maps.mean(0))


def test_every_slice_has_predictions_from_the_maps_own_pass(scan, nodules, biomarker_folds):
    """Per-slice predictions (the 2.5D stack) equal a plain forward of each slice's input; the central one is
    the prediction; the ensemble's per-slice mean and sd are numpy's over the folds."""
    import torch

    from lidc_cdam.ct.inputs import CENTRE, model_inputs

    crop = M.read_crop(nodules[1].crop_path)
    models = [M.load_checked_model(p) for p in biomarker_folds]
    singles = [drain(crop_steps(m, crop, m.targets, "cdam", "axial", "nodule"), None) for m in models]
    for m, r in zip(models, singles, strict=True):
        assert CENTRE in r.slices and len(r.slice_predictions) == len(r.slices) > 1
        with torch.no_grad():
            outputs = m.model(model_inputs(crop["image"], "axial", r.slices, m.input_stats, m.image_size)).numpy()
        for k, s in enumerate(r.slices):
            expected = M.predictions(m, outputs[k])
            assert r.predictions_at(s) == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert r.predictions_at(CENTRE) == pytest.approx(r.predictions, rel=1e-6)
        assert r.predictions_at(max(r.slices) + 1) is None
        assert len({round(p["subtlety"], 6) for p in r.slice_predictions}) > 1  # the slices differ
    ens = explain_crop(models, crop, slices="nodule")
    np.testing.assert_allclose(ens.model_maps, np.stack([r.maps for r in singles]), rtol=1e-5, atol=1e-7)
    for s in ens.slices:
        mean, sd = ens.predictions_at(s)
        values = np.array([r.predictions_at(s)["texture"] for r in singles])
        assert mean["texture"] == pytest.approx(values.mean()) and sd["texture"] == pytest.approx(values.std())


def test_steps_report_progress_and_trust_needs_no_extra_pass():
    """explain_crop_steps yields (done, total) over all models; the trust flag from the maps' own latents equals
    the one from a separate forward pass (the shipped phantom model carries training statistics)."""
    from lidc_cdam.ct.ensemble import crop_trust, explain_crop_steps
    from lidc_cdam.models.demo_weights import shipped_checkpoint

    model = M.load_checked_model(shipped_checkpoint("phantom-malignancy"))
    crop = M.read_crop(M.list_nodules(synthetic()["crops_dir"], M.read_ct(synthetic()["dicom"]))[0].crop_path)
    steps = explain_crop_steps([model, model], crop, slices="nodule", batch=4)
    seen = []
    while True:
        try:
            seen.append(next(steps))
        except StopIteration as stop:
            result = stop.value
            break
    totals = {t for _, t in seen}
    assert len(totals) == 1 and seen[-1][0] == totals.pop() and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert result.trust is not None
    again = crop_trust([model, model], crop, result.view)  # latents from a separate forward
    assert result.trust["per_model"] == pytest.approx(again["per_model"], abs=1e-6)


def test_point_targets_and_cache(scan, nodules, folds, biomarker_folds, tmp_path):
    """``targets`` keeps the tasks that explain them; a second run comes from the cache (memory, then disk) with the
    same maps; another crop is a miss."""
    from lidc_cdam.ct.cache import MapCache

    centre = M.crop_centre_world(M.read_crop(nodules[0].crop_path))
    cache = MapCache(tmp_path / "cache")
    first = explain_point(scan, centre, [*folds[:2], biomarker_folds[0]], slices="nodule", targets=["spiculation"],
                          cache=cache)
    (ens,) = first.ensembles
    assert ens.targets == ["spiculation"] and ens.n == 1 and ens.mean_maps.shape[0] == 1
    both = explain_point(scan, centre, [*folds[:2], biomarker_folds[0]], slices="nodule",
                         targets=["malignancy", "spiculation"], cache=cache)
    assert [e.targets for e in both.ensembles] == [["malignancy"], ["spiculation"]]
    again = explain_point(scan, centre, [biomarker_folds[0]], slices="nodule", targets=["spiculation"],
                          cache=MapCache(tmp_path / "cache"))
    assert not ens.cached and again.ensembles[0].cached and both.ensembles[1].cached
    np.testing.assert_array_equal(again.ensembles[0].mean_maps, ens.mean_maps)
    assert again.ensembles[0].slice_mean == ens.slice_mean
    with pytest.raises(M.CTError, match="none of the checkpoints explains"):
        explain_point(scan, centre, folds[:1], targets=["texture"])


def test_a_3d_checkpoint_explains_the_whole_crop(scan, nodules, biomarker_folds, tmp_path):
    """A 3D model (MONAI ViT, view "3d") reads the whole crop in one pass: its maps are the token maps upsampled
    trilinearly to the crop grid, its prediction the model's output on the volume; no 2.5D stack. A 3D task and a
    2D task explain one point side by side; one ensemble cannot mix them."""
    import torch
    import torch.nn.functional as F

    from lidc_cdam.ct.inputs import volume_input
    from lidc_cdam.ct.testing import tiny_3d_checkpoint
    from lidc_cdam.explain import explain

    paths = [tiny_3d_checkpoint(tmp_path / f"m3d-{s}.pt", seed=s) for s in range(2)]
    centre = M.crop_centre_world(M.read_crop(nodules[1].crop_path))
    result = explain_point(scan, centre, [*paths, biomarker_folds[0]], view="coronal")
    ens3d, ens2d = result.ensembles
    assert (ens3d.view, ens2d.view) == ("3d", "coronal") and ens3d.n == 2
    assert ens3d.slices == list(range(32)) and ens3d.slice_mean is None and ens3d.predictions_at(16) is None
    m = M.load_checked_model(paths[0])
    x = volume_input(result.crop.image, m.input_stats, m.image_size)
    assert x.shape == (1, 1, 32, 32, 32)
    attr = explain(m.model, x, targets=["malignant"])
    assert attr.maps.shape == (1, 1, 4, 4, 4)
    want = F.interpolate(attr.maps.float(), size=(32, 32, 32), mode="trilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(ens3d.model_maps[0, 0], want.numpy(), rtol=1e-5, atol=1e-7)
    assert (np.abs(ens3d.model_maps[0, 0]) > 0).mean() > 0.9  # every slice of the volume has a map
    with torch.no_grad():
        assert ens3d.per_model[0] == pytest.approx(M.predictions(m, m.model(x)[0].numpy()), rel=1e-5)
    with pytest.raises(M.CTError, match="cannot mix 3D and 2D"):
        explain_crop([paths[0], tiny_checkpoint(tmp_path / "m2d.pt")], result.crop.crop)
