"""Each biomarker's rendered cause follows its rating, and its cause region is where the rendering changed."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

from lidc_cdam.data.lidc.phantom_causes import (
    CAUSE_REGION,
    REGIONS,
    Ratings,
    axis_ratio_of,
    calcified_core,
    elongated,
    elongated_cover,
    lobulated,
    nodule_shape,
    paint,
    render_causes,
    rounded,
    spikes,
    stretched,
    texture_hu,
)

SIZE = 32
NEUTRAL = Ratings(subtlety=5.0, calcification=6.0, sphericity=5.0, margin=5.0, lobulation=1.0, spiculation=1.0,
                  texture=5.0)


def ball(radius: float = 5.0, size: int = SIZE) -> np.ndarray:
    g = np.mgrid[:size, :size, :size] - (size - 1) / 2
    return ((g**2).sum(0) <= radius**2).astype(float)


def render(ratings: Ratings, radius: float = 5.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    background = np.full((SIZE,) * 3, -850.0)
    return render_causes(ball(radius), ratings, background, np.zeros((SIZE,) * 3), rng)


def axis_ratio(mask: np.ndarray) -> float:
    """Long / short axis of the central axial plane's second moments."""
    yx = np.argwhere(mask[SIZE // 2])
    eig = np.linalg.eigvalsh(np.cov(yx.T))
    return float(np.sqrt(eig[-1] / eig[0]))


def test_every_target_has_a_region():
    assert set(CAUSE_REGION.values()) <= set(REGIONS)
    assert len(CAUSE_REGION) == 8


def test_sphericity_sets_the_axis_ratio_and_keeps_the_area():
    sphere = ball()
    ratios = [axis_ratio(stretched(sphere, s) >= 0.5) for s in (5.0, 4.0, 3.0, 1.0)]
    assert ratios[0] == pytest.approx(1.0, abs=0.05)
    assert all(a < b for a, b in itertools.pairwise(ratios)), ratios
    assert ratios[-1] == pytest.approx(2.5, rel=0.15)
    assert (stretched(sphere, 1.0) >= 0.5).sum() == pytest.approx(sphere.sum(), rel=0.1)
    g = np.mgrid[:SIZE, :SIZE, :SIZE] - (SIZE - 1) / 2
    cigar = ((g[0] / 5) ** 2 + (g[1] / 3) ** 2 + (g[2] / 8) ** 2 <= 1).astype(float)  # its own ratio 8 : 3
    assert axis_ratio(stretched(cigar, 5.0) >= 0.5) == pytest.approx(1.0, abs=0.15)  # made round
    assert axis_ratio(stretched(cigar, 1.0) >= 0.5) == pytest.approx(2.5, rel=0.15)


def test_lobulation_adds_lobes_graded_by_the_rating():
    sphere = ball() > 0.5
    changed = [(lobulated(sphere, level, 0.0) ^ sphere).sum() for level in (1.0, 2.0, 3.5, 5.0)]
    assert changed[0] == 0
    assert all(a < b for a, b in itertools.pairwise(changed)), changed


def test_spiculation_grows_spikes_outside_the_nodule():
    sphere = ball() > 0.5
    sizes = [(spikes(sphere, level, np.random.default_rng(1)) >= 0.5).sum() for level in (1.0, 2.0, 3.5, 5.0)]
    assert sizes[0] == 0
    assert all(a < b for a, b in itertools.pairwise(sizes)), sizes
    assert not (spikes(sphere, 5.0, np.random.default_rng(1))[sphere] > 0).any()


def test_calcified_core_shrinks_as_the_rating_rises_and_is_absent_at_6():
    sphere = ball(6.0) > 0.5
    volume = {c: calcified_core(sphere, c, np.random.default_rng(0)).sum() for c in (3.0, 5.0, 5.75, 6.0)}
    assert volume[6.0] == 0
    assert volume[3.0] > volume[5.0] > volume[5.75] > 0
    assert (calcified_core(sphere, 2.0, np.random.default_rng(0)) <= sphere).all()


def test_texture_sets_the_interior_hu():
    means = []
    for texture in (1.0, 3.0, 4.0, 4.5, 5.0):
        image, _, regions = render(replace(NEUTRAL, texture=texture))
        means.append(image[regions["interior"]].mean())
    assert all(a < b for a, b in itertools.pairwise(means)), means
    assert means[0] == pytest.approx(-700, abs=5) and means[-1] == pytest.approx(30, abs=5)


def test_margin_blurs_the_edge():
    def edge_step(margin: float) -> float:
        image, _, _ = render(replace(NEUTRAL, margin=margin))
        profile = image[SIZE // 2, SIZE // 2]
        return float(np.abs(np.diff(profile)).max())

    steps = [edge_step(m) for m in (1.0, 3.0, 5.0)]
    assert steps[0] < steps[1] < steps[2], steps


def test_subtlety_hazes_the_surround():
    means = []
    for subtlety in (1.0, 3.0, 4.5, 5.0):
        image, _, regions = render(replace(NEUTRAL, subtlety=subtlety))
        means.append(image[regions["surround"]].mean())
    assert all(a > b for a, b in itertools.pairwise(means)), means
    assert means[-1] == pytest.approx(-850, abs=10)


def test_calcification_core_is_calcium():
    image, _, regions = render(replace(NEUTRAL, calcification=3.0), radius=6.0)
    assert regions["core"].any() and image[regions["core"]].mean() > 400


def test_regions_are_where_they_say():
    _image, mask, regions = render(replace(NEUTRAL, calcification=3.0, spiculation=4.0, lobulation=3.0))
    assert set(regions) == set(REGIONS)
    assert (regions["nodule"] == mask).all()
    assert not (regions["interior"] & regions["core"]).any()
    assert not (regions["boundary"] & regions["surround"]).any()
    assert not (regions["spikes"] & regions["surround"]).any()
    assert (regions["core"] <= mask).all() and (regions["spikes"] <= mask).all()
    assert regions["spikes"].any() and regions["surround"].any()


def test_neutral_nodule_has_no_core_and_no_spikes():
    _, _, regions = render(NEUTRAL)
    assert not regions["core"].any() and not regions["spikes"].any()


def test_phantom_crops_carry_the_cause_regions(tmp_path):
    from lidc_cdam.data.lidc.crops import read_crop
    from lidc_cdam.data.lidc.phantoms import build_phantoms

    build_phantoms(tmp_path, n_scans=1, progress=False)
    files = sorted((tmp_path / "crops").glob("*.npz"))
    assert files
    for f in files:
        crop = read_crop(f)
        for target in CAUSE_REGION:
            region = crop[f"cause_{target}"]
            assert region.shape == crop["image"].shape and region.dtype == np.uint8
        assert (crop["cause_diameter_mm"] == crop["mask"]).all()
        assert crop["mask"].any()


def test_what_if_phantom_renders_the_changed_ratings():
    from lidc_cdam.data.lidc.phantoms import what_if_phantom

    nodule = "LIDC-IDRI-0835_s0820_n02"  # rated calcification 4.25, margin 3.5, texture 4.25
    plain = what_if_phantom(nodule, {})
    what_if = what_if_phantom(nodule, {"calcification": 6.0, "margin": 5.0, "texture": 5.0})
    calcified = what_if_phantom(nodule, {"calcification": 2.0})
    assert not what_if["cause_calcification"].any() and plain["cause_calcification"].any()
    assert calcified["cause_calcification"].sum() > plain["cause_calcification"].sum()
    note = str(calcified["note"])
    assert "calcification 2" in note and "what-if" in note
    interior = what_if["cause_texture"] > 0
    assert what_if["image"][interior].mean() > plain["image"][plain["cause_texture"] > 0].mean()
    np.testing.assert_array_equal(plain["crop_to_world"], what_if["crop_to_world"])
    with pytest.raises(ValueError, match="malignancy"):
        what_if_phantom(nodule, {"malignancy": 5})


def test_held_out_r_squared():
    import pandas as pd
    import torch

    from lidc_cdam.train.cross_validation import training_mean_mse
    from lidc_cdam.train.engine import task_metrics

    labels = torch.tensor([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0], [3.0, 1.0]])
    perfect = task_metrics(labels.clone(), labels, "biomarkers", ["a", "b"])
    assert perfect["r2_a"] == pytest.approx(1.0) and np.isnan(perfect["r2_b"])  # b is constant: undefined
    assert perfect["r2"] == pytest.approx(1.0)
    own_mean = task_metrics(labels.mean(0, keepdim=True).expand_as(labels), labels, "biomarkers", ["a", "b"])
    assert own_mean["r2_a"] == pytest.approx(0.0)
    half = task_metrics(labels * 0.5 + 0.75, labels, "biomarkers", ["a", "b"])
    assert half["r2_a"] == pytest.approx(1 - half["mse_a"] / labels[:, 0].var(unbiased=False).item())
    train = pd.DataFrame({"a": [0.0, 1.0, 2.0, 3.0]})
    test = pd.DataFrame({"a": [10.0, 11.0]})  # a shifted test part: the training mean does worse than 0
    baseline = training_mean_mse(train, test, ["a"])
    assert baseline["r2_a"] < 0
    # in the model's units (a wider std, as with phantom variants): MSE scales, R^2 does not
    wider = training_mean_mse(train, test, ["a"], scale=[2 * float(train["a"].std(ddof=0))])
    assert wider["mse_a"] == pytest.approx(baseline["mse_a"] / 4) and wider["r2_a"] == pytest.approx(baseline["r2_a"])


def test_each_fold_starts_from_its_own_backbone():
    from lidc_cdam.resources import config_dir
    from lidc_cdam.train.config import load_train_config

    preset = config_dir("train") / "tiny-phantom-malignancy.yaml"
    config = load_train_config(preset, ["backbone.checkpoint=runs/bio/fold{fold}/best.pt"])
    assert config.for_fold(3).backbone.checkpoint == "runs/bio/fold3/best.pt"
    assert config.for_fold(3).fingerprint() != config.for_fold(2).fingerprint()
    plain = load_train_config(preset, [])
    assert plain.for_fold(1) is plain  # no checkpoint: from scratch, unchanged


def plane_axis(mask2d: np.ndarray) -> tuple[float, np.ndarray]:
    """``(long / short axis ratio, unit long axis (y, x))`` of a 2D mask's second moments."""
    eig, vec = np.linalg.eigh(np.cov(np.argwhere(mask2d).T))
    return float(np.sqrt(eig[1] / eig[0])), vec[:, 1]


def test_axis_ratio_of_is_steepest_where_most_nodules_are_rated():
    ratios = [axis_ratio_of(s) for s in (1.0, 2.0, 3.0, 4.0, 5.0)]
    assert ratios == pytest.approx([3.4, 3.0, 2.6, 1.8, 1.0])
    assert ratios[2] - ratios[4] > ratios[0] - ratios[2]


def test_rounded_makes_each_slice_round_keeps_its_area_and_finds_the_long_axis():
    g = np.mgrid[:SIZE, :SIZE, :SIZE] - (SIZE - 1) / 2
    u = np.array([np.sin(0.5), np.cos(0.5)])  # the long axis (y, x), 29 degrees off x
    along, across = g[1] * u[0] + g[2] * u[1], -g[1] * u[1] + g[2] * u[0]
    cigar = ((g[0] / 5) ** 2 + (along / 9) ** 2 + (across / 4) ** 2 <= 1).astype(float)  # its own ratio 9 : 4
    assert plane_axis(cigar[SIZE // 2] >= 0.5)[0] == pytest.approx(2.25, rel=0.1)
    out, axis = rounded(cigar)
    assert abs(float(axis @ u)) == pytest.approx(1.0, abs=0.01)
    for z in range(SIZE // 2 - 2, SIZE // 2 + 3):
        assert plane_axis(out[z] >= 0.5)[0] == pytest.approx(1.0, abs=0.1), z
    assert (out >= 0.5).sum() == pytest.approx(cigar.sum(), rel=0.05)


def test_elongated_gives_every_slice_the_ratio_of_the_rating_along_one_axis():
    sphere = ball(6.0)
    u = np.array([0.6, 0.8])
    ratios = []
    for s in (5.0, 4.0, 3.0, 2.0, 1.0):
        out = elongated(sphere, s, u) >= 0.5
        ratio, axis = plane_axis(out[SIZE // 2])
        ratios.append(ratio)
        if s < 5:
            assert abs(float(axis @ u)) == pytest.approx(1.0, abs=0.02)
        assert out.sum() == pytest.approx(sphere.sum(), rel=0.06)
    assert ratios == pytest.approx([axis_ratio_of(s) for s in (5.0, 4.0, 3.0, 2.0, 1.0)], rel=0.12)


def test_a_twisted_ribbon_comes_out_with_one_ratio_and_one_axis():
    """Real contours turn from slice to slice: each slice's own elongation is replaced by the rating's."""
    g = np.mgrid[:SIZE, :SIZE, :SIZE] - (SIZE - 1) / 2
    angle = 0.25 * g[0]  # the slice's own long axis turns by 14 degrees a slice
    along = g[1] * np.sin(angle) + g[2] * np.cos(angle)
    across = -g[1] * np.cos(angle) + g[2] * np.sin(angle)
    ribbon = ((g[0] / 6) ** 2 + (along / 8) ** 2 + (across / 3.5) ** 2 <= 1).astype(float)
    round_soft, axis = rounded(ribbon)
    out = elongated(round_soft, 4.0, axis) >= 0.5
    for z in range(SIZE // 2 - 2, SIZE // 2 + 3):
        ratio, long_axis = plane_axis(out[z])
        assert ratio == pytest.approx(axis_ratio_of(4.0), rel=0.15), z
        assert abs(float(long_axis @ axis)) == pytest.approx(1.0, abs=0.03), z


def test_render_version_3_shows_the_ratings_axis_ratio_on_the_central_slice():
    g = np.mgrid[:SIZE, :SIZE, :SIZE] - (SIZE - 1) / 2
    rho = np.sqrt((g[0] / 5) ** 2 + (g[1] / 3.5) ** 2 + (g[2] / 8) ** 2)
    cigar = np.clip(0.5 + 5 * (1 - rho), 0.0, 1.0)  # soft-edged as a resampled contour, its own ratio 8 : 3.5
    background = np.full((SIZE,) * 3, -850.0)
    for sphericity in (5.0, 4.0, 3.0):
        ratings = replace(NEUTRAL, sphericity=sphericity)
        _, mask, _ = render_causes(cigar, ratings, background, np.zeros_like(background), np.random.default_rng(0),
                                   version=3)
        assert axis_ratio(mask) == pytest.approx(axis_ratio_of(sphericity), rel=0.12), sphericity
    with pytest.raises(ValueError, match="render version"):
        render_causes(cigar, NEUTRAL, background, np.zeros_like(background), np.random.default_rng(0), version=6)


def test_elongated_cover_keeps_a_small_slices_ratio_in_its_partial_volume():
    """Render 4: a 5-6 mm nodule's slice has too few voxels for a binary outline to hold a 1.8 : 1 ratio; its
    partial volume does, within 6 %, and keeps the area."""
    g = np.mgrid[:9, :SIZE, :SIZE]
    for radius in (2.5, 3.5):
        disc = ((g[1] - 15.7) ** 2 + (g[2] - 16.2) ** 2 <= radius**2) & (abs(g[0] - 4) <= 3)
        for s in (5.0, 4.0, 3.0, 2.0):
            cover = elongated_cover(disc, s, np.array([0.6, 0.8]))
            assert cover.min() >= 0.0 and cover.max() <= 1.0
            assert weighted_axis_ratio(cover[4]) == pytest.approx(axis_ratio_of(s), rel=0.06), (radius, s)
            assert cover[4].sum() == pytest.approx(disc[4].sum(), rel=0.05)
            assert np.array_equal(cover[0], disc[0])  # an empty slice stays empty


def weighted_axis_ratio(weight: np.ndarray) -> float:
    yx = np.argwhere(np.ones_like(weight, dtype=bool)).T
    w = weight.ravel()
    c = yx @ w / w.sum()
    d = yx - c[:, None]
    eig = np.linalg.eigvalsh((d * w) @ d.T / w.sum())
    return float(np.sqrt(eig[1] / eig[0]))


def test_render_version_4_paints_the_partial_volume_and_splits_into_shape_and_paint():
    g = np.mgrid[:SIZE, :SIZE, :SIZE] - (SIZE - 1) / 2
    rho = np.sqrt((g[0] / 4) ** 2 + (g[1] / 3) ** 2 + (g[2] / 3.5) ** 2)
    small = np.clip(0.5 + 5 * (1 - rho), 0.0, 1.0)
    background = np.full((SIZE,) * 3, -850.0)
    for sphericity in (5.0, 4.0, 3.0):
        ratings = replace(NEUTRAL, sphericity=sphericity)
        image, mask, regions = render_causes(small, ratings, background, np.zeros_like(background),
                                             np.random.default_rng(0), version=4)
        weight = np.clip((image[SIZE // 2] + 850.0) / (texture_hu(5.0) + 850.0), 0.0, 1.0)  # the painted cover
        assert weighted_axis_ratio(weight) == pytest.approx(axis_ratio_of(sphericity), rel=0.1), sphericity
        assert not np.array_equal(weight, weight.round())  # partial volume, not a binary outline
        shape = nodule_shape(small, ratings, np.random.default_rng(0), version=4)
        assert np.array_equal(shape.mask, mask) and np.array_equal(paint(shape, ratings, background,
                                                                         np.zeros_like(background)), image)
        assert all(np.array_equal(regions[k], v) for k, v in shape.regions().items())
    with pytest.raises(ValueError, match="render version"):
        render_causes(small, NEUTRAL, background, np.zeros_like(background), np.random.default_rng(0), version=6)


def test_render_5_spikes_are_even_and_add_no_elongation_of_their_own():
    sphere = ball(4.0) > 0.5
    for seed in range(3):
        jittered = spikes(sphere, 5.0, np.random.default_rng(seed))
        even = spikes(sphere, 5.0, np.random.default_rng(seed), even=True)
        # eight spikes, all in the axial plane and of one length: the central slice stays round
        assert axis_ratio((even >= 0.5) | sphere) == pytest.approx(1.0, abs=0.05)
        assert (even[SIZE // 2] >= 0.5).sum() > 0.6 * (even >= 0.5).sum() / 3
        assert axis_ratio((jittered >= 0.5) | sphere) > axis_ratio((even >= 0.5) | sphere)
    g = np.mgrid[:SIZE, :SIZE, :SIZE] - (SIZE - 1) / 2
    oval = (g[0] / 4) ** 2 + (g[1] / 3) ** 2 + (g[2] / 6) ** 2 <= 1  # axis ratio 2 : 1 in-plane
    for seed in range(3):  # the tips lie on the oval scaled up: the spiked outline keeps most of its ratio
        even = spikes(oval, 5.0, np.random.default_rng(seed), even=True) >= 0.5
        jittered = spikes(oval, 5.0, np.random.default_rng(seed)) >= 0.5
        assert axis_ratio(oval) > axis_ratio(even | oval) > max(0.75 * axis_ratio(oval), axis_ratio(jittered | oval))
    # render 5 is render 4 but for the spikes: the same draws, the same body, core and paint
    ratings = replace(NEUTRAL, sphericity=3.0, spiculation=4.0, calcification=3.0, lobulation=3.0)
    four, five = (nodule_shape(ball(4.0), ratings, np.random.default_rng(0), version=v) for v in (4, 5))
    assert np.array_equal(four.body, five.body) and np.array_equal(four.core, five.core)
    assert not np.array_equal(four.spike, five.spike)
    assert np.array_equal(nodule_shape(ball(4.0), NEUTRAL, np.random.default_rng(0), version=5).mask,
                          nodule_shape(ball(4.0), NEUTRAL, np.random.default_rng(0), version=4).mask)


def test_render_4_paints_the_lung_without_vessels():
    from lidc_cdam.data.lidc.phantom_render import lung_background

    for seed in range(4):
        plain = lung_background(np.random.default_rng(seed), vessels=False)
        assert plain.max() < -700 and abs(plain.mean() + 850) < 5  # parenchyma (-850 +- 25 x unit noise) only
        assert lung_background(np.random.default_rng(seed)).max() > -100  # the vessels (+40 HU) otherwise
