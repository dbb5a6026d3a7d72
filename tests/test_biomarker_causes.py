"""The ground-truth test of per-target maps (issue 22): evidence in each target's own rendered cause region.

Phantoms, not CT: the crops are phantom nodules whose biomarkers have a rendered cause
(:mod:`lidc_cdam.data.lidc.phantom_causes`); the model is the shipped phantom biomarker model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_lidc_phantoms import phantom_dir

from lidc_cdam.data.lidc.model_input import CENTRE, slice_plane
from lidc_cdam.data.lidc.nodule_inputs import load_planes, read_data_table
from lidc_cdam.evaluate.cause_regions import CAUSE_COLUMNS, cause_columns, other_regions
from lidc_cdam.evaluate.cause_report import cause_rows, cause_table, example_nodule, left_out_table
from lidc_cdam.evaluate.cohort import CohortSettings, run_cohort

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "benchmarks" / "results" / "biomarker-causes"
CHEAP = dict(n_boxes=1, box_sizes=(1,), percents=(0, 50), concepts=(), randomization_nodules=0)


def _regions() -> dict[str, torch.Tensor]:
    own = torch.zeros(16, 16, dtype=torch.bool)
    own[4:8, 4:8] = True  # 16 pixels
    other = torch.zeros(16, 16, dtype=torch.bool)
    other[10:14, 10:14] = True
    overlapping = own.clone()
    overlapping[4:8, 8:10] = True  # own's 16 pixels and 8 more
    return {"own": own, "other": other, "overlapping": overlapping, "empty": torch.zeros(16, 16, dtype=torch.bool)}


def test_cause_metrics_on_hand_made_maps_and_regions():
    regions = _regions()
    others = other_regions(regions)
    assert int(others["own"].sum()) == 16 + 8  # the other square and the overlap's 8 pixels outside own
    assert not (others["own"] & regions["own"]).any()  # own pixels never count against own
    inside = regions["own"].float()
    in_other = regions["other"].float() - 0.5 * regions["own"].float()  # negative evidence in own: not counted
    uniform = torch.ones(16, 16)
    maps = torch.stack([inside, uniform, in_other, uniform, uniform])
    rows = cause_columns(maps, ["own", "own", "own", "empty", "malignant"], regions)
    area, other_area = 16 / 256, 24 / 256
    concentrated, flat, wrong, empty, no_region = rows
    assert concentrated["share_cause"] == pytest.approx(1.0) and concentrated["share_other"] == pytest.approx(0.0)
    assert concentrated["discrimination"] == pytest.approx(1.0) and concentrated["pointing_cause"] == 1.0
    assert concentrated["uniform_cause"] == pytest.approx(area) and concentrated["uniform_other"] == pytest.approx(
        other_area)
    assert concentrated["uniform_discrimination"] == pytest.approx(area - other_area)
    assert concentrated["cause_pixels"] == 16
    # a uniform map gives the area fractions: its discrimination is the uniform baseline's
    for column in ("cause", "other", "discrimination"):
        share = "discrimination" if column == "discrimination" else f"share_{column}"
        uniform_column = "uniform_discrimination" if column == "discrimination" else f"uniform_{column}"
        assert flat[share] == pytest.approx(flat[uniform_column])
    assert wrong["share_cause"] == pytest.approx(0.0) and wrong["share_other"] == pytest.approx(1.0)
    assert wrong["discrimination"] == pytest.approx(-1.0) and wrong["pointing_cause"] == 0.0
    # of either sign: concentrated and flat maps as above; the wrong map's -0.5 on own now counts (8 of 24)
    assert concentrated["abs_share_cause"] == pytest.approx(1.0) and concentrated["abs_discrimination"] == 1.0
    assert flat["abs_share_cause"] == pytest.approx(area) and flat["abs_share_other"] == pytest.approx(other_area)
    assert wrong["abs_share_cause"] == pytest.approx(8 / 24) and wrong["abs_share_other"] == pytest.approx(16 / 24)
    assert wrong["abs_discrimination"] == pytest.approx(-8 / 24)
    negative = cause_columns(-inside[None], ["own"], regions)[0]  # a cause that lowers the rating
    assert negative["share_cause"] == 0.0 and negative["abs_share_cause"] == pytest.approx(1.0)
    assert empty["cause_pixels"] == 0 and all(math.isnan(empty[c]) for c in CAUSE_COLUMNS if c != "cause_pixels")
    assert all(math.isnan(no_region[c]) for c in CAUSE_COLUMNS)

    # the summaries leave empty regions out and count them
    metrics = pd.DataFrame([{"fold": 0, "nodule_id": f"n{j}", "model": "m", "target": t, "method": "cdam", **r}
                            for j in range(3)
                            for t, r in zip(["calcification", "spiculation", "malignant"],
                                            cause_columns(maps[[0, 2, 4]] if j else maps[[3, 3, 4]],
                                                          ["own", "empty" if j == 2 else "own", "malignant"],
                                                          regions), strict=True)])
    rows = cause_rows(metrics)
    assert sorted(zip(rows["nodule_id"], rows["target"], strict=True)) == [
        ("n0", "calcification"), ("n0", "spiculation"), ("n1", "calcification"), ("n1", "spiculation"),
        ("n2", "calcification")]
    assert list(rows["cause_region"].unique()) == ["core", "spikes"]
    left = left_out_table(metrics).set_index("target")
    assert left.loc["spiculation", "nodules"] == 2 and left.loc["spiculation", "left_out"] == 1
    assert "malignant" not in left.index
    table = cause_table(rows).set_index("target")
    calc = table.loc["calcification"]
    assert calc["n"] == 3 and calc["share_cause_lo"] <= calc["share_cause"] <= calc["share_cause_hi"]
    assert calc["cause_over_uniform"] == pytest.approx(calc["share_cause"] / area)
    assert calc["abs_discrimination_lo"] <= calc["abs_discrimination"] <= calc["abs_discrimination_hi"]
    assert example_nodule(rows) == "n0"


def test_planes_carry_the_cause_regions_and_ct_crops_have_none(tmp_path):
    root = phantom_dir()
    table = read_data_table(root).sort_values("nodule_id").head(2)
    planes = load_planes(root, table, "axial")
    assert len(planes.causes) == 8 and planes.causes["texture"].shape == (2, 32, 32)
    with np.load(root / table["crop_path"].iloc[0]) as crop:
        margin = slice_plane(crop["cause_margin"], "axial", CENTRE) > 0
        np.testing.assert_array_equal(planes.causes["margin"][0], margin)
        plain = {k: crop[k] for k in crop.files if not k.startswith("cause_")}
    (tmp_path / "crops").mkdir()
    np.savez(tmp_path / table["crop_path"].iloc[0], **plain)  # a crop as `lidc-cdam preprocess` writes it
    assert load_planes(tmp_path, table.head(1), "axial").causes == {}


def test_cohort_measures_every_target_in_its_cause_region(tmp_path):
    root = phantom_dir()
    settings = CohortSettings(methods={"cdam": {}, "gradcam": {}, "attention": {}}, **CHEAP)
    summary = run_cohort(["phantom-biomarkers"], root, tmp_path / "run", settings=settings, progress=False)
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert set(CAUSE_COLUMNS) <= set(metrics.columns) and metrics["nodule_id"].nunique() == 2
    has = metrics[metrics["cause_pixels"] > 0]
    assert len(has) and set(has["target"]) >= {"subtlety", "sphericity", "margin", "texture", "diameter_mm"}
    values = has[list(CAUSE_COLUMNS)].to_numpy(float)
    assert np.isfinite(values).all()
    for column in ("share_cause", "uniform_cause", "pointing_cause", "share_other", "uniform_other",
                   "abs_share_cause", "abs_share_other"):
        assert has[column].between(0, 1).all(), column
    np.testing.assert_allclose(has["discrimination"], has["share_cause"] - has["share_other"], atol=1e-9)
    np.testing.assert_allclose(has["abs_discrimination"], has["abs_share_cause"] - has["abs_share_other"], atol=1e-9)
    # the uniform share is the region's area fraction on the crop's plane (the 32 -> 64 px nearest resize doubles)
    crops = read_data_table(root).set_index("nodule_id")["crop_path"]
    for row in has.drop_duplicates(["nodule_id", "target"]).itertuples():
        with np.load(root / crops[row.nodule_id]) as crop:
            region = slice_plane(crop[f"cause_{row.target}"], "axial", CENTRE) > 0
        assert row.uniform_cause == pytest.approx(region.mean(), abs=1e-9)
        assert row.cause_pixels == 4 * region.sum()
    empty = metrics[metrics["cause_pixels"] == 0]
    assert empty[["share_cause", "discrimination"]].isna().all().all()
    # attention ignores the target: margin and lobulation share the boundary band, so their shares are equal
    att = has[has["method"] == "attention"].set_index(["nodule_id", "target"])["share_cause"]
    for nodule in has["nodule_id"].unique():
        assert att[(nodule, "margin")] == pytest.approx(att[(nodule, "lobulation")], abs=1e-6)

    folder = tmp_path / "run" / "causes"
    for name in ("tables.md", "causes.csv", "tables/causes.csv", "tables/left_out.csv", "figures/cause_maps.png",
                 "figures/discrimination.png", "figures/abs_discrimination.png", "settings.json", "summary.json"):
        assert (folder / name).exists(), name
    rows = pd.read_csv(folder / "causes.csv")
    assert len(rows) == len(has) and summary["causes"]["example_nodule"] in set(rows["nodule_id"])
    table = pd.read_csv(folder / "tables" / "causes.csv")
    assert len(table) == 3 * has["target"].nunique()
    left = pd.read_csv(folder / "tables" / "left_out.csv")
    assert (left["nodules"] + left["left_out"] == 2).all()
    assert "## Discrimination" in (folder / "tables.md").read_text()


@pytest.mark.slow
@pytest.mark.committed_results
def test_committed_cause_results_are_reproduced(tmp_path):
    """The committed per-nodule cause rows of the fold-0 test nodules among the first 4 scans, recomputed with the
    shipped biomarker model and the committed methods, equal the committed ``causes.csv`` (rel / abs 1e-3).

    Under the kernel-set check (``KERNEL_SUBSET``): one nodule and four methods (gradients, SmoothGrad-CDAM, seeded
    per nodule, partial LRP, Grad-CAM); a row depends on no other nodule or method."""
    if not (COMMITTED / "causes.csv").exists():
        pytest.skip(f"{COMMITTED.relative_to(REPO)}/causes.csv is not committed yet (made by the command in "
                    "benchmarks/results/biomarker-causes/README.md once the final weights are shipped)")
    from helpers import KERNEL_SUBSET

    from lidc_cdam.data.lidc.folds import read_folds
    from lidc_cdam.models.demo_weights import sha256_of, shipped_checkpoint

    committed_settings = json.loads((COMMITTED / "settings.json").read_text())
    shipped = sha256_of(shipped_checkpoint("phantom-biomarkers"))
    kept = {c["name"]: c["sha256"] for c in committed_settings["checkpoints"]}
    assert kept.get("biomarkers") == shipped, "the committed results are not of the shipped biomarker weights: rerun"
    run = committed_settings["settings"]
    methods, nodules, folds_table = run["methods"], ["LIDC-IDRI-0003_s0014_n02", "LIDC-IDRI-0004_s0015_n01"], None
    if KERNEL_SUBSET:
        methods = {m: methods[m] for m in ("cdam", "smooth-cdam", "partial-lrp", "gradcam")}
        folds = read_folds()
        folds.loc[folds["nodule_id"].isin(nodules[:1]), "fold"] = 1  # the first nodule leaves test fold 0
        nodules, folds_table = nodules[1:], tmp_path / "folds.csv"
        folds.to_csv(folds_table, index=False)
    settings = CohortSettings(methods=methods, seed=run["seed"], **CHEAP)
    run_cohort(["phantom-biomarkers"], phantom_dir(), tmp_path / "run", settings=settings, progress=False,
               folds_table=folds_table)
    fresh = pd.read_csv(tmp_path / "run" / "causes" / "causes.csv")
    committed = pd.read_csv(COMMITTED / "causes.csv")
    keys = ["fold", "nodule_id", "model", "target", "method"]
    merged = fresh.merge(committed, on=keys, suffixes=("", "_committed"))
    assert set(fresh["nodule_id"]) == set(nodules)
    assert len(merged) == len(fresh) > 0 and set(fresh["method"]) == set(methods)
    for column in CAUSE_COLUMNS:
        np.testing.assert_allclose(merged[column], merged[f"{column}_committed"], rtol=1e-3, atol=1e-3,
                                   err_msg=column)


def test_readme_of_the_committed_results_gives_the_command():
    readme = (COMMITTED / "README.md").read_text()
    assert "--causes-out benchmarks/results/biomarker-causes" in readme
