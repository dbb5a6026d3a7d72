"""Cross-checks of our evaluation metrics against Quantus 0.6.0 (docs/method.md, "Evaluation", cross-checks).

What Quantus computes (read from its source, ``quantus/metrics/faithfulness/region_perturbation.py``
and ``quantus/metrics/complexity/effective_complexity.py``):

* ``RegionPerturbation`` cuts the image into ``patch_size`` blocks (row-major), ranks the blocks by
  the *sum* of the attribution inside each block (over pixels and, after broadcasting, channels;
  ``np.argsort``, not stable), then perturbs the blocks cumulatively in that order ("morf":
  descending, "lerf": ascending), calling ``perturb_func`` on the *already perturbed* image, and
  records ``f(x) - f(x_k)`` for ``k = 1 .. regions_evaluation``.
* ``EffectiveComplexity`` counts (an integer, not a share) the entries with ``a > eps`` after
  ``normalise_func`` and then ``abs`` were applied to the whole ``a_batch`` at once.

Correspondence with ``perturbation_curves`` / ``compactness``:

* Token-level maps (one distinct score per patch, upsampled nearest) on a 4 x 5 grid of 8-px
  patches: each patch is 64 / 1280 = 5 % of the pixels, so at p = 5k % our first ``floor(p H W /
  100) = 64 k`` ranked pixels are exactly the top-k patches (ties inside a patch do not matter,
  distinct token scores make the patch order unambiguous, so Quantus's unstable argsort agrees with
  our stable sort). Quantus's curve value ``k`` is ``ours[0] - ours[k]``.
* Our perturbation replaces pixels by a blurred copy of the *unperturbed* image, computed once.
  Quantus passes the current, already perturbed image to ``perturb_func``; a perturb_func that
  replaces the region by the pre-blurred image's pixels makes the cumulative result identical to
  ours (a perturb_func that blurs its input would not). Differences that do not show up here by
  construction: Quantus ranks patches by summed scores (ours ranks pixels, so pixel-level maps can
  differ), pads images whose size is not a multiple of the patch (edge for x, zeros for a), has no
  p = 0 point, and always feeds the model ``torch.Tensor(x)``, i.e. float32; the model below is
  float64 behind a cast, with float32-representable image and blur, so both sides see the same
  inputs and agree to float64 round-off.
* Compactness uses ``|S| <= 0.05 max(S)`` with the *signed* max per image, the complement of
  ``|S| / max(S) > 0.05``, i.e. Quantus with a per-image signed-max ``normalise_func`` and
  ``abs=True``. Quantus's own ``normalise_by_max`` divides by ``max |S|`` (so it only agrees when
  the largest magnitude is positive) and by default over the whole batch.
* Quantus's AUC still calls ``np.trapz``, removed in numpy 2.4: restored with ``monkeypatch``
  inside the test that needs it.
"""

import numpy as np
import pytest
import torch
from helpers import tiny_vit

from lidc_cdam.evaluate import PERCENTS, compactness, gaussian_blur, perturbation_curves, trapezoid

quantus = pytest.importorskip("quantus")

# Quantus reports suspicious settings (e.g. "perturbation caused no change") as UserWarnings: fail on them
pytestmark = pytest.mark.filterwarnings("error::UserWarning")

PATCH = 8
GH, GW = 4, 5  # 20 patches: one patch = 5 % of the pixels
H, W = GH * PATCH, GW * PATCH
N_IMAGES = 3
RECORD = [0, 3, 5]


class _Float64Input(torch.nn.Module):
    """Quantus feeds ``torch.Tensor(x)`` (float32); run the float64 model on the same values."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(torch.float64))


def _replace_by_blurred(arr: np.ndarray, indices: np.ndarray, blurred: np.ndarray, **kwargs) -> np.ndarray:
    """Quantus perturb_func: the region's pixels (flat indices per image) from the pre-blurred images."""
    rows = np.arange(arr.shape[0])[:, None]
    out = arr.copy()
    out[rows, indices] = blurred.reshape(arr.shape[0], -1)[rows, indices]
    return out


@pytest.fixture(scope="module")
def token_case():
    model = tiny_vit(torch.float64, img_size=(H, W), patch_size=PATCH).eval()
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(N_IMAGES, 3, H, W, generator=gen).to(torch.float64)  # float32 values
    blurred = gaussian_blur(images).to(torch.float32).to(torch.float64)  # both sides use these values
    # distinct signed token scores (a permutation of a spread of values), upsampled nearest to pixels
    tokens = torch.stack([torch.randperm(GH * GW, generator=gen) for _ in range(N_IMAGES)]).to(torch.float64)
    tokens = ((tokens - 7.5) * 0.37).view(N_IMAGES, GH, GW)
    maps = tokens.repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2)
    with torch.no_grad():
        ours = [
            perturbation_curves(model, images[i], blurred[i], maps[i][None], record=[RECORD[i]])
            for i in range(N_IMAGES)
        ]
    return model, images, blurred, maps, ours


def _region_perturbation(order: str, blurred: torch.Tensor) -> "quantus.RegionPerturbation":
    return quantus.RegionPerturbation(
        patch_size=PATCH,
        order=order,
        regions_evaluation=len(PERCENTS) - 1,  # k = 1 .. 19 patches = 5 .. 95 %
        abs=False,
        normalise=False,
        perturb_func=_replace_by_blurred,
        perturb_func_kwargs={"blurred": blurred.to(torch.float32).numpy()},
        disable_warnings=True,
    )


def _run(metric, model, images, maps) -> np.ndarray:
    scores = metric(
        model=_Float64Input(model).eval(),
        x_batch=images.to(torch.float32).numpy(),
        y_batch=np.array(RECORD),
        a_batch=maps[:, None].numpy(),
        channel_first=True,
        softmax=False,
        device="cpu",
        batch_size=N_IMAGES,
    )
    return np.asarray(scores)


def test_mapping_of_token_maps_to_whole_patches(token_case):
    _, _, _, maps, _ = token_case
    counts = [p * H * W // 100 for p in PERCENTS]
    assert counts == [k * PATCH * PATCH for k in range(len(PERCENTS))]
    assert all(len(torch.unique(m)) == GH * GW for m in maps)


@pytest.fixture(scope="module")
def quantus_runs(token_case):
    """One RegionPerturbation run per order: the metric (holds the scores) and the drops ``[N, 19]``."""
    model, images, blurred, maps, _ = token_case
    runs = {}
    for order in ("morf", "lerf"):
        metric = _region_perturbation(order, blurred)
        runs[order] = metric, _run(metric, model, images, maps)
    return runs


@pytest.mark.parametrize(("order", "curve"), [("morf", "mif"), ("lerf", "lif")])
def test_region_perturbation_reproduces_token_level_curves(token_case, quantus_runs, order, curve):
    ours = token_case[-1]
    quantus_drop = quantus_runs[order][1]  # f(x) - f(x_k), k = 1 .. 19 patches
    assert quantus_drop.shape == (N_IMAGES, len(PERCENTS) - 1)
    for i in range(N_IMAGES):
        raw = ours[i][curve][0].numpy()  # raw outputs at 0, 5, ..., 95 %
        np.testing.assert_allclose(quantus_drop[i], raw[0] - raw[1:], rtol=0, atol=1e-12)
        other = ours[i]["lif" if curve == "mif" else "mif"][0].numpy()
        assert np.abs(quantus_drop[i] - (other[0] - other[1:])).max() > 1e-2, "the ranking direction matters"
    assert np.ptp(quantus_drop) > 1e-2, "the curves are not flat"


def test_region_perturbation_auc_relates_to_our_area(token_case, quantus_runs, monkeypatch):
    """Quantus's AUC is ``np.trapz`` of the drops ``d_1 .. d_19`` with ``dx = 1`` (no ``d_0 = 0``
    point); ours is the trapezoid of raw outputs over p = 0 .. 95 %:
    ``A_MIF = 95 f(x) - 5 (AUC + d_1 / 2)``."""
    ours = token_case[-1]
    metric, drops = quantus_runs["morf"]
    if np.lib.NumpyVersion(np.__version__) >= "2.4.0":  # np.trapz is gone: Quantus's AUC fails as is
        assert not hasattr(np, "trapz")
        with pytest.raises(AttributeError, match="trapz"):
            _ = metric.get_auc_score
    if hasattr(np, "trapezoid"):  # numpy >= 2.0: also avoids np.trapz's DeprecationWarning before 2.4
        monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)
    aucs = [quantus.helpers.utils.calculate_auc(d) for d in metric.evaluation_scores]
    for i in range(N_IMAGES):
        raw = ours[i]["mif"][0]
        area = trapezoid(raw, PERCENTS).item()
        np.testing.assert_allclose(area, 95 * raw[0].item() - 5 * (aucs[i] + drops[i, 0] / 2), rtol=0, atol=1e-10)
    assert metric.get_auc_score == pytest.approx(np.mean(aucs), rel=1e-12)


def _signed_max_per_image(a: np.ndarray) -> np.ndarray:
    """Quantus normalise_func: each map divided by its own signed max (our compactness's reference)."""
    return a / a.max(axis=tuple(range(1, a.ndim)), keepdims=True)


@pytest.fixture(scope="module")
def native_maps():
    """Signed token maps (14 x 14, ViT-S/16's grid) with scales 1e-3 .. 1e2; in the first three the
    largest magnitude is positive, in the last three negative (the max stays positive)."""
    gen = torch.Generator().manual_seed(3)
    maps = torch.randn(6, 14, 14, generator=gen, dtype=torch.float64) ** 3
    for i in range(6):
        positive_dominates = maps[i].max() >= -maps[i].min()
        if positive_dominates != (i < 3):
            maps[i] = -maps[i]
    maps = maps * torch.logspace(-3, 2, 6, dtype=torch.float64).view(-1, 1, 1)
    flat = maps.flatten(1)
    assert (flat.amax(1) > 0).all()
    assert ((flat.amax(1) >= -flat.amin(1)) == torch.arange(6).lt(3)).all()
    # no score within round-off of a threshold (signed max, max |S|, batch max |S|): counts are unambiguous
    for ref in (flat.amax(1, keepdim=True), flat.abs().amax(1, keepdim=True), flat.abs().max()):
        assert ((flat.abs() - 0.05 * ref).abs() > 1e-9 * ref).all()
    return maps


def _effective_complexity(maps: torch.Tensor, **kwargs) -> np.ndarray:
    metric = quantus.EffectiveComplexity(eps=0.05, disable_warnings=True, **kwargs)
    a = maps[:, None].numpy()
    scores = metric(model=None, x_batch=np.zeros_like(a), y_batch=np.zeros(len(a), int), a_batch=a, channel_first=True)
    return np.asarray(scores)


def test_effective_complexity_with_per_image_signed_max_is_one_minus_compactness(native_maps):
    n = native_maps[0].numel()
    counts = _effective_complexity(native_maps, abs=True, normalise=True, normalise_func=_signed_max_per_image)
    ours = compactness(native_maps).numpy()
    np.testing.assert_allclose(counts / n, 1 - ours, rtol=0, atol=1e-12)
    assert (ours > 0.05).all() and (ours < 0.95).all(), "neither trivially empty nor full"


def test_effective_complexity_quantus_normalisations(native_maps):
    """Quantus's ``normalise_by_max`` divides by ``max |S|``: per image (``normalise_axes``) it equals
    ``1 - compactness`` where the largest magnitude is positive and counts fewer scores where it is
    negative; by default it normalises over the whole batch, which undercounts small-scale maps."""
    n = native_maps[0].numel()
    flat = native_maps.flatten(1)
    ours = 1 - compactness(native_maps).numpy()
    per_image = _effective_complexity(native_maps, normalise_func_kwargs={"normalise_axes": (1, 2, 3)}) / n
    np.testing.assert_allclose(per_image[:3], ours[:3], rtol=0, atol=1e-12)
    expected = (flat.abs() > 0.05 * flat.abs().amax(1, keepdim=True)).double().mean(1).numpy()
    np.testing.assert_allclose(per_image, expected, rtol=0, atol=1e-12)
    assert (per_image[3:] < ours[3:]).all()
    batch = _effective_complexity(native_maps) / n  # Quantus's default: normalise over the batch
    np.testing.assert_allclose(batch, (flat.abs() > 0.05 * flat.abs().max()).double().mean(1).numpy(), atol=1e-12)
    assert batch[0] < ours[0]
