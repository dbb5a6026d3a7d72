"""One model-input contract (lidc_cdam.data.lidc.model_input): training's MONAI transforms and the CT path give
the same input tensor for the same crop, and the same numbers as the MONAI chain used before the contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Compose, NormalizeIntensityd, RepeatChanneld, Resized

from lidc_cdam.ct import inputs as ct_inputs
from lidc_cdam.data.lidc import model_input
from lidc_cdam.data.lidc.datasets import LoadCropd, SliceViewd, Stats, transforms


@pytest.fixture()
def crop_file(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(-1000, 401, size=(32, 32, 32)).astype(np.int16)
    mask = np.zeros((32, 32, 32), bool)
    mask[12:20, 10:22, 14:18] = True
    np.savez(tmp_path / "crop.npz", image=image, mask=mask)
    return tmp_path, image


STATS = Stats(mean=-512.5, std=380.25, biomarker_mean=np.zeros(8), biomarker_std=np.ones(8))
INPUT_STATS = {"mean": STATS.mean, "std": STATS.std}


@pytest.mark.parametrize("view", list(model_input.VIEWS))
@pytest.mark.parametrize("size", [224, 32, 64])
def test_training_transform_equals_the_ct_path(crop_file, view, size):
    root, image = crop_file
    trained = transforms(STATS, view=view, train=False, root=root, size=size)({"image": "crop.npz"})["image"]
    ct = ct_inputs.model_inputs(image, view, [model_input.CENTRE], INPUT_STATS, size)[0]
    assert trained.shape == (3, size, size) and trained.dtype == torch.float32
    assert torch.equal(torch.as_tensor(trained), ct)
    # the same numbers as the MONAI chain the training used before the one contract
    before = Compose([LoadCropd("image", root=root), SliceViewd(("image", "mask"), view=view),
                      RepeatChanneld("image", repeats=3),
                      Resized("image", spatial_size=(size, size), mode="bilinear", align_corners=False),
                      NormalizeIntensityd("image", subtrahend=STATS.mean, divisor=STATS.std)])({"image": "crop.npz"})
    assert torch.equal(torch.as_tensor(before["image"]).as_subclass(torch.Tensor), ct)


@pytest.mark.parametrize("size", [32, 48])
def test_3d_training_transform_equals_the_ct_path(crop_file, size):
    root, image = crop_file
    trained = transforms(STATS, view=model_input.VOLUME, train=False, root=root, size=size)({"image": "crop.npz"})
    ct = ct_inputs.volume_input(image, INPUT_STATS, size)[0]
    assert trained["image"].shape == (1, size, size, size) and trained["mask"].shape == (1, size, size, size)
    assert torch.equal(torch.as_tensor(trained["image"]), ct)


def test_the_ct_path_uses_the_contract():
    assert ct_inputs.model_inputs is model_input.model_inputs and ct_inputs.VIEWS is model_input.VIEWS
    assert ct_inputs.CENTRE == model_input.CENTRE == 16 and model_input.HU_WINDOW == (-1000, 400)


def test_training_slices_jitter_inside_the_contract(crop_file):
    root, _ = crop_file
    tf = transforms(STATS, view="axial", train=True, root=root, rotate_prob=0.0)
    tf.set_random_state(seed=0)
    seen = {tf({"image": "crop.npz"})["slice_index"] for _ in range(40)}
    assert seen == set(range(model_input.TRAIN_SLICES[0], model_input.TRAIN_SLICES[1] + 1))
