"""Perturbation metrics against hand computations on a model whose output is linear in the pixels."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from lidc_cdam.evaluate import PERCENTS, box_sensitivity, compactness, gaussian_blur, perturbation_curves, trapezoid
from lidc_cdam.evaluate.perturbation import box_masks, box_output_changes, pearson, sample_boxes

H = W = 24


@pytest.fixture
def linear():
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(3, 3, H, W, generator=gen, dtype=torch.float64)  # 3 outputs
    image = torch.rand(3, H, W, generator=gen, dtype=torch.float64)
    blurred = gaussian_blur(image[None], sigma=3.0)[0]

    def score_fn(x):
        return torch.einsum("nchw,ochw->no", x, weights)

    return weights, image, blurred, score_fn


def test_blur_equals_scipy_mirror_with_a_113_tap_kernel():
    img = torch.rand(1, 3, 120, 130, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = gaussian_blur(img)[0].numpy()
    for c in range(3):  # scipy's "mirror" is PyTorch's "reflect"; radius int(4 * 14 + 0.5) = 56
        expected = gaussian_filter(img[0, c].numpy(), sigma=14, mode="mirror", truncate=4.0)
        np.testing.assert_allclose(ours[c], expected, rtol=1e-10, atol=1e-12)


def test_mif_lif_curves_equal_a_hand_computation(linear):
    weights, image, blurred, score_fn = linear
    maps = torch.randn(2, H, W, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    maps[0, :4, :4] = 0.5  # ties: broken by pixel index
    curves = perturbation_curves(score_fn, image, blurred, maps, record=[1, 2], batch_size=7)
    x, b, w = image.numpy(), blurred.numpy(), weights.numpy()
    for k, record in enumerate([1, 2]):
        flat = maps[k].numpy().ravel()
        for name, order in (("mif", np.argsort(-flat, kind="stable")), ("lif", np.argsort(flat, kind="stable"))):
            expected = []
            for p in PERCENTS:
                chosen = np.zeros(H * W, bool)
                chosen[order[: p * H * W // 100]] = True
                pert = np.where(chosen.reshape(H, W)[None], b, x)
                expected.append((pert * w[record]).sum())
            np.testing.assert_allclose(curves[name][k].numpy(), expected, rtol=1e-12)


def test_exact_contributions_give_monotone_curves_and_positive_fidelity(linear):
    weights, image, blurred, score_fn = linear
    contribution = ((image - blurred) * weights[0]).sum(0)[None]  # what blurring each pixel removes
    noise = torch.randn(1, H, W, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    maps = torch.cat([contribution, noise])
    curves = perturbation_curves(score_fn, image, blurred, maps, record=[0, 0])
    # for a linear model, ranking by the exact contributions is optimal: MIF lowest, LIF highest
    assert torch.all(curves["mif"][0] <= curves["mif"][1] + 1e-12)
    assert torch.all(curves["lif"][0] >= curves["lif"][1] - 1e-12)
    assert torch.all(curves["mif"][0].diff().diff() >= -1e-9), "removed contributions shrink in order"
    fidelity = trapezoid(curves["lif"], PERCENTS) - trapezoid(curves["mif"], PERCENTS)
    assert fidelity[0].item() > fidelity[1].item() and fidelity[0].item() > 0
    np.testing.assert_allclose(trapezoid(torch.tensor([0.0, 1.0, 1.0]), [0, 5, 10]).item(), 7.5)


def test_box_sensitivity_is_one_for_exact_contributions_and_matches_numpy(linear):
    weights, image, blurred, score_fn = linear
    sizes = [1, 2]
    corners = sample_boxes((H, W), 4, sizes, 30, torch.Generator().manual_seed(3))
    assert corners.shape == (2, 30, 2) and corners.min() >= 0 and corners[1].max() <= H - 8
    masks = box_masks(corners, sizes, 4, (H, W))
    assert masks[0].flatten(1).sum(1).eq(16).all() and masks[1].flatten(1).sum(1).eq(64).all()
    changes = box_output_changes(score_fn, image, blurred, masks, record=0, batch_size=11)
    exact = ((image - blurred) * weights[0]).sum(0)
    noise = torch.randn(H, W, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    f_box = box_sensitivity(torch.stack([exact, noise]), masks, changes)
    np.testing.assert_allclose(f_box[0].numpy(), [1.0, 1.0], rtol=1e-10)
    for s in range(2):
        sums = [(noise.numpy() * masks[s, i].numpy()).sum() for i in range(30)]
        np.testing.assert_allclose(f_box[1, s].item(), np.corrcoef(sums, changes[s].numpy())[0, 1], rtol=1e-10)


def test_box_sampling_is_seeded_and_rejects_boxes_larger_than_the_image():
    a = sample_boxes((32, 32), 8, [1, 3], 5, torch.Generator().manual_seed(0))
    b = sample_boxes((32, 32), 8, [1, 3], 5, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="does not fit"):
        sample_boxes((32, 32), 8, [5], 5, torch.Generator())


def test_compactness_and_pearson_edge_cases():
    maps = torch.tensor([[[10.0, 0.4], [-0.5, 0.6]]])  # threshold 0.5: |0.4|, |-0.5| count
    assert compactness(maps).item() == pytest.approx(0.5)
    assert pearson(torch.ones(5), torch.arange(5.0)).item() == 0.0


def test_evaluate_image_shares_boxes_and_gives_zero_delta_for_class_agnostic_maps(linear):
    from lidc_cdam.evaluate.metrics import evaluate_image

    weights, image, blurred, score_fn = linear
    calls = []

    def counting(x):
        calls.append(x.shape[0])
        return score_fn(x)

    exact = ((image - blurred) * weights[0]).sum(0)
    other = ((image - blurred) * weights[1]).sum(0)
    maps = {"exact": torch.stack([exact, other]), "agnostic": torch.stack([exact.abs(), exact.abs()])}
    out = evaluate_image(counting, image, blurred, maps, record=0, patch=4, box_sizes=[1, 2, 3], n_boxes=20)
    box_forwards = 3 * 20 + 1
    curve_forwards = 2 * 2 * 2 * len(PERCENTS)  # methods x (mif, lif) x maps x levels
    assert sum(calls) == box_forwards + curve_forwards
    assert out["agnostic"].delta_fidelity == pytest.approx(0.0) and out["agnostic"].delta_box == pytest.approx(0.0)
    assert out["exact"].a_box == pytest.approx(2.0)  # f_box = 1 at each of 3 sizes, trapezoid over s = 1..3
    assert out["exact"].delta_fidelity > 0 and out["exact"].delta_box > 0
    assert 0.0 <= out["exact"].compactness <= 1.0


def test_localisation_scores_by_hand():
    from lidc_cdam.evaluate.localisation import pointing_game, positive_share_in_mask

    maps = torch.tensor([[[3.0, -1.0], [1.0, 0.0]], [[-1.0, -2.0], [-3.0, -4.0]], [[2.0, 2.0], [0.0, 1.0]]])
    masks = torch.tensor([[[1, 0], [0, 0]], [[1, 1], [1, 1]], [[0, 1], [0, 0]]]).bool()
    torch.testing.assert_close(positive_share_in_mask(maps, masks), torch.tensor([0.75, 0.0, 0.4]))
    assert pointing_game(maps, masks).tolist() == [True, True, True]
    assert pointing_game(maps[:1], ~masks[:1]).tolist() == [False]
