"""MONAI datasets for the model input: shapes, z-scoring with training statistics, targets, rotations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from monai.transforms import Compose
from test_lidc_phantoms import phantom_dir

from lidc_cdam.data.lidc.datasets import SliceViewd, lidc_datasets, transforms
from lidc_cdam.data.lidc.nodules import BIOMARKERS


def folds_for(out) -> pd.DataFrame:
    """Six phantom nodules: test fold 0 (2), val fold 1 (1), train the other 3."""
    ids = sorted(pd.read_csv(out / "nodules.csv")["nodule_id"])
    return pd.DataFrame({"nodule_id": ids, "fold": [0, 0, 1, 2, 3, 4]})


@pytest.mark.parametrize("view", ["axial", "coronal", "sagittal"])
def test_shapes_and_targets(view):
    parts = lidc_datasets(phantom_dir(), fold=0, view=view, task="regression", folds=folds_for(phantom_dir()))
    assert [len(parts[k]) for k in ("train", "val", "test")] == [3, 1, 2]
    for name in ("train", "test"):
        item = parts[name][0]
        assert item["image"].shape == (3, 224, 224) and item["image"].dtype == torch.float32
        assert torch.equal(item["image"][0], item["image"][2])
        assert item["target"].shape == (8,) and item["label"].item() in (0.0, 1.0)
    assert parts["test"][0]["slice_index"] == 16
    cls = lidc_datasets(phantom_dir(), fold=0, view=view, task="classification", folds=folds_for(phantom_dir()))
    assert cls["test"][0]["target"].shape == ()


def test_statistics_come_from_the_training_fold_only():
    out = phantom_dir()
    folds = folds_for(out)
    parts = lidc_datasets(out, fold=0, task="regression", folds=folds)
    train = parts["tables"]["train"]
    images = np.stack([np.load(out / p)["image"] for p in train["crop_path"]]).astype(np.float64)
    assert parts["stats"].mean == pytest.approx(images.mean()) and parts["stats"].std == pytest.approx(images.std())
    bio = train[list(BIOMARKERS)].to_numpy(float)
    np.testing.assert_allclose(parts["stats"].biomarker_mean, bio.mean(0))
    z = torch.stack([parts["train"][i]["biomarkers"] for i in range(3)]).numpy()
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-6)
    # other folds' nodules do not move the statistics
    other = lidc_datasets(out, fold=1, val_fold=0, task="regression", folds=folds)
    assert other["stats"].mean == pytest.approx(parts["stats"].mean)
    assert sorted(other["tables"]["train"]["nodule_id"]) == sorted(train["nodule_id"])
    swapped = lidc_datasets(out, fold=2, val_fold=0, task="regression", folds=folds)
    assert swapped["stats"].mean != pytest.approx(parts["stats"].mean)
    # z-scored input: the eval pipeline's centre slice equals (resized slice - mean) / std
    item = parts["test"][0]
    raw = np.load(out / parts["tables"]["test"]["crop_path"].iloc[0])["image"][16].astype(np.float32)
    resized = torch.nn.functional.interpolate(torch.from_numpy(raw)[None, None], size=(224, 224), mode="bilinear")
    expected = (resized[0, 0] - parts["stats"].mean) / parts["stats"].std
    torch.testing.assert_close(item["image"][0], expected, atol=1e-3, rtol=1e-4)


def test_training_slices_and_rotations():
    out = phantom_dir()
    parts = lidc_datasets(out, fold=0, folds=folds_for(out), rotate_prob=1.0, seed=3)
    stats = parts["stats"]
    path = parts["tables"]["train"]["crop_path"].iloc[0]
    seen_k, seen_i = set(), set()
    for _ in range(8):
        item = parts["train"][0]
        i = item["slice_index"]
        assert 14 <= i <= 18
        seen_i.add(i)
        plain = transforms(stats, train=False, root=out)
        steps = list(plain.transforms)
        steps[1] = SliceViewd(("image", "mask"), index=i)
        ref = Compose(steps)({"image": path})["image"]
        ks = [k for k in (1, 2, 3) if torch.allclose(item["image"], torch.rot90(ref, k, dims=(1, 2)), atol=1e-5)]
        assert ks, "a rotation by a multiple of 90 degrees"
        seen_k.update(ks)
    assert len(seen_i) > 1 and len(seen_k) > 1


def _second_moments(mask: torch.Tensor) -> tuple[float, np.ndarray]:
    """(area, eigenvalues of the covariance) of a 2D mask."""
    ys, xs = np.nonzero(mask.numpy() > 0.5)
    return float(len(ys)), np.linalg.eigvalsh(np.cov(np.stack([ys, xs]).astype(float)))


def test_any_angle_rotation_turns_image_and_mask_together_and_keeps_their_shape():
    out = phantom_dir()
    parts = lidc_datasets(out, fold=0, folds=folds_for(out), rotate_prob=1.0, seed=3, rotation="any", size=64)
    path = parts["tables"]["train"]["crop_path"].iloc[0]
    steps = list(transforms(parts["stats"], train=False, root=out, size=64).transforms)
    orientations = set()
    for _ in range(6):
        item = parts["train"][0]
        assert item["image"].shape == (3, 64, 64) and item["mask"].shape == (1, 64, 64)
        steps[1] = SliceViewd(("image", "mask"), index=item["slice_index"])
        area, eig = _second_moments(Compose(steps)({"image": path})["mask"][0])  # the same slice, not turned
        a, e = _second_moments(item["mask"][0])
        # the same nodule, turned: area and principal moments kept (nearest-neighbour resampling: a few %)
        assert abs(a - area) <= 0.1 * area and np.allclose(e, eig, rtol=0.25)
        # the image turned with the mask: the nodule is bright where the mask is
        inside = item["image"][0][item["mask"][0] > 0.5].mean()
        assert inside > item["image"][0][item["mask"][0] < 0.5].mean()
        ys, xs = np.nonzero(item["mask"][0].numpy() > 0.5)
        long_axis = np.linalg.eigh(np.cov(np.stack([ys, xs])))[1][:, 1]
        orientations.add(round(float(np.degrees(np.arctan2(*long_axis))) % 180))
    assert len(orientations) > 2  # not only quarter turns of one orientation
    with pytest.raises(ValueError, match="rotation must be one of"):
        lidc_datasets(out, fold=0, folds=folds_for(out), rotation="sideways")


def test_any_angle_rotation_of_a_volume_turns_every_axial_slice_alike():
    from lidc_cdam.data.lidc.datasets import rotations

    volume = np.zeros((1, 8, 24, 24), dtype=np.float32)
    volume[0, 2:6, 10:14, 4:20] = 1.0  # a bar along x on slices 2-5
    tf = Compose(rotations("any", 1.0, dims=3))
    tf.set_random_state(seed=0)
    for _ in range(4):
        turned = tf({"image": volume.copy(), "mask": volume.copy()})
        mask = np.asarray(turned["mask"])[0]
        assert mask[[0, 1, 6, 7]].sum() == 0  # no voxel leaves its axial slice
        per_slice = mask[2:6].reshape(4, -1).sum(1)
        assert np.all(per_slice == per_slice[0]) and abs(per_slice[0] - 64) <= 8


def test_crop_paths_must_stay_inside_the_data_folder(tmp_path):
    import pandas as pd

    from lidc_cdam.data.lidc.datasets import check_crop_paths
    from lidc_cdam.data.lidc.errors import LidcError

    check_crop_paths(pd.DataFrame({"nodule_id": ["a"], "crop_path": ["crops/a.npz"]}), tmp_path)
    for bad in ("../outside.npz", "crops/../../outside.npz", "/etc/passwd"):
        with pytest.raises(LidcError, match="leaves the data folder"):
            check_crop_paths(pd.DataFrame({"nodule_id": ["a"], "crop_path": [bad]}), tmp_path)
