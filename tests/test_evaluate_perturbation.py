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


def test_box_sampling_is_seeded_and_rejects_boxes_as_large_as_the_image():
    a = sample_boxes((32, 32), 8, [1, 3], 5, torch.Generator().manual_seed(0))
    b = sample_boxes((32, 32), 8, [1, 3], 5, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    for size in (4, 5):  # 32 px (the whole image) and 40 px
        with pytest.raises(ValueError, match=rf"box size {size} \(side {size} x 8 = {size * 8} px\) would cover the "
                                             r"32x32 image.*at most 3 patches"):
            sample_boxes((32, 32), 8, [1, size], 5, torch.Generator())
    with pytest.raises(ValueError, match="would cover the 40x24 image"):  # the shorter side counts
        sample_boxes((40, 24), 8, [3], 5, torch.Generator())


def test_evaluate_image_rejects_a_box_as_large_as_the_image_before_any_forward_pass(linear):
    from lidc_cdam.evaluate.metrics import evaluate_image

    _, image, blurred, score_fn = linear
    calls = []

    def counting(x):
        calls.append(x.shape[0])
        return score_fn(x)

    maps = {"m": torch.ones(H, W, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"box size 6 \(side 6 x 4 = 24 px\) would cover the 24x24 image"):
        evaluate_image(counting, image, blurred, maps, record=0, patch=4, box_sizes=[1, 2, 6], n_boxes=5)
    assert calls == []  # no size silently dropped, no work done
    out = evaluate_image(counting, image, blurred, maps, record=0, patch=4, box_sizes=[1, 5], n_boxes=5)
    assert out["m"].box_sizes == (1, 5)  # 20 px < 24 px is kept


F32_EPS = torch.finfo(torch.float32).eps


def _noisy(value: float, relative: float, n: int, seed: int) -> torch.Tensor:
    """``value`` repeated ``n`` times in float32, with noise of ``relative * |value|`` (RMS)."""
    noise = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (value + abs(value) * relative * noise).to(torch.float32)


def test_pearson_is_zero_for_a_side_constant_up_to_round_off():
    real = torch.randn(100, generator=torch.Generator().manual_seed(0)).float()
    for value in (3.5, -1e4, 2e-20):  # the spread is relative to the magnitude, at any magnitude
        noisy = _noisy(value, 1e-7, 100, 1)  # about one float32 epsilon
        assert noisy.unique().numel() > 3  # a few ULPs apart
        assert pearson(noisy, real).item() == 0.0 and pearson(real, noisy).item() == 0.0
        assert pearson(noisy, _noisy(value, 1e-7, 100, 2)).item() == 0.0
    # the old rule (0 only where exactly constant) correlates the noise
    noisy = _noisy(3.5, 1e-7, 100, 1)
    assert pearson(noisy, noisy + real * 1e-9, rtol=0.0).item() > 0.9
    # float64: its own, much smaller epsilon; 1e-7 relative is real variation there
    noisy64 = 3.5 + 3.5e-7 * real.double()
    assert pearson(noisy64, real.double()).item() == pytest.approx(1.0)


def test_pearson_scales_give_the_magnitude_the_round_off_is_relative_to():
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(100, generator=gen) * 1e-6
    other = noise + torch.randn(100, generator=gen) * 1e-7  # correlated with the noise
    # a box sum near 0 by cancellation of summands of magnitude 10: its spread is round-off
    assert pearson(noise, other).item() > 0.9  # default scale max |x| ~ 3e-6: looks real
    assert pearson(noise, other, a_scale=10.0).item() == 0.0
    assert pearson(noise, other, b_scale=torch.tensor(10.0)).item() == 0.0
    # per-row scales broadcast over the leading dimensions
    rows = torch.stack([noise, noise])
    r = pearson(rows, other.expand(2, -1), a_scale=torch.tensor([10.0, 1e-6]))
    assert r[0].item() == 0.0 and r[1].item() > 0.9


def test_pearson_keeps_small_but_real_variation():
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(100, generator=gen, dtype=torch.float64)
    other = base + 0.5 * torch.randn(100, generator=gen, dtype=torch.float64)
    expected = np.corrcoef(base.numpy(), other.numpy())[0, 1]
    for relative in (1e-3, 8 * 1024 * F32_EPS):  # 8x the tolerance: kept
        a = (5.0 + 5.0 * relative * base).float()
        assert a.std().item() / 5.0 > 1024 * F32_EPS
        assert pearson(a, other.float()).item() == pytest.approx(expected, rel=0.02)
    tiny = (5.0 + 5.0 * (1024 * F32_EPS / 8) * base).float()  # 1/8 of the tolerance: round-off
    assert pearson(tiny, other.float()).item() == 0.0


def _whole_image_masks(n: int) -> torch.Tensor:
    return torch.ones(1, n, H, W, dtype=torch.bool)


def test_box_covering_the_image_gives_exactly_zero(linear):
    weights, image, blurred, _ = linear
    n = 40
    masks = _whole_image_masks(n)
    maps = torch.randn(3, H, W, generator=torch.Generator().manual_seed(6))  # float32
    maps[2] = maps[2].abs()
    sums = torch.einsum("khw,snhw->ksn", maps, masks.float())
    assert (sums == sums[..., :1]).all()  # identical sums; their mean still differs by round-off
    # logit changes that are one number up to round-off, large or tiny against the logits (10)
    for change in (2.0, -0.3, 1e-5):
        changes = (change + 10.0 * 1e-7 * torch.randn(1, n, generator=torch.Generator().manual_seed(7))).float()
        assert changes.unique().numel() > 3
        f_box = box_sensitivity(maps, masks, changes, output_scale=10.0)
        assert f_box.shape == (3, 1) and (f_box == 0).all()
        assert (box_sensitivity(maps, masks, changes, output_scale=torch.tensor([10.0])) == 0).all()
    # sums with round-off noise too (and a correlated noise on the changes)
    noisy_sums = sums[0, 0] * (1 + 1e-7 * torch.randn(n, generator=torch.Generator().manual_seed(8)))
    assert pearson(noisy_sums, noisy_sums * 1e-3 + 1.0).item() == 0.0
    # through box_output_changes: a float32 model whose batches differ by round-off
    gen = torch.Generator().manual_seed(9)
    w32, image32, blurred32 = weights.float(), image.float(), blurred.float()

    def noisy_score(x):
        out = torch.einsum("nchw,ochw->no", x, w32)
        return out * (1 + F32_EPS * torch.randn(out.shape, generator=gen))

    changes, scale = box_output_changes(noisy_score, image32, blurred32, masks, record=0, batch_size=16,
                                        return_scale=True)
    assert changes.shape == (1, n) and scale.shape == (1,) and changes.unique().numel() > 1
    f_box = box_sensitivity(maps, masks, changes, output_scale=scale)
    assert (f_box == 0).all()


def test_box_of_seven_eighths_of_the_image_is_not_zeroed(linear):
    """Float32, box side 21 px of 24: real variation, the correlation equals a float64 computation."""
    weights, image, blurred, _ = linear
    w32, image32, blurred32 = weights.float(), image.float(), blurred.float()

    def score32(x):
        return torch.einsum("nchw,ochw->no", x, w32)

    sizes, patch = [7], 3
    corners = sample_boxes((H, W), patch, sizes, 50, torch.Generator().manual_seed(10))
    masks = box_masks(corners, sizes, patch, (H, W))
    changes, scale = box_output_changes(score32, image32, blurred32, masks, record=0, return_scale=True)
    exact = ((image - blurred) * weights[0]).sum(0)
    noise = torch.randn(H, W, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    maps = torch.stack([exact, noise + 3.0])  # the second: a large offset, small relative spread of the sums
    f_box = box_sensitivity(maps.float(), masks, changes, output_scale=scale)
    assert f_box[0, 0].item() == pytest.approx(1.0, abs=1e-4)
    sums = torch.einsum("hw,nhw->n", maps[1], masks[0].double())
    assert 0 < sums.std().item() / sums.abs().max().item() < 0.05
    expected = np.corrcoef(sums.numpy(), changes[0].double().numpy())[0, 1]
    assert abs(expected) > 0.05
    assert f_box[1, 0].item() == pytest.approx(expected, rel=1e-3)


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
    from lidc_cdam.evaluate.localisation import absolute_share_in_mask, pointing_game, positive_share_in_mask

    maps = torch.tensor([[[3.0, -1.0], [1.0, 0.0]], [[-1.0, -2.0], [-3.0, -4.0]], [[2.0, 2.0], [0.0, 1.0]]])
    masks = torch.tensor([[[1, 0], [0, 0]], [[1, 1], [1, 1]], [[0, 1], [0, 0]]]).bool()
    torch.testing.assert_close(positive_share_in_mask(maps, masks), torch.tensor([0.75, 0.0, 0.4]))
    torch.testing.assert_close(absolute_share_in_mask(maps, masks), torch.tensor([0.6, 1.0, 0.4]))
    assert absolute_share_in_mask(torch.zeros(1, 2, 2), masks[:1]).tolist() == [0.0]  # a zero map: defined, 0
    assert pointing_game(maps, masks).tolist() == [True, True, True]
    assert pointing_game(maps[:1], ~masks[:1]).tolist() == [False]
