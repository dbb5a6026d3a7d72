"""`lidc-cdam demo`, the README's first command, on the cached demo model."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lidc_cdam.pipelines.cli import main
from lidc_cdam.pipelines.demo_lidc import WHAT_IF

from lidc_cdam.resources import manifest_path


@pytest.mark.slow
def test_demo_writes_figures_and_each_map_favours_its_own_digit(demo_model, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--digits", "--out", str(out), "--images", "8"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["images"]) == 8
    figures = sorted((out / "figures").glob("*.png"))
    assert len(figures) == 8
    # on average, positive evidence sits on the explained digit, not on the other one
    for method in ("cdam", "smooth-cdam", "integrated-cdam"):
        own = np.mean([r["positive_share_on_own_digit"][method] for r in summary["images"]])
        other = np.mean([r["positive_share_on_other_digit"][method] for r in summary["images"]])
        assert own > 0.6 and other < 0.3, (method, own, other)
        assert summary["share_of_maps_more_positive_on_own_digit"][method] >= 0.75
    maps = np.load(out / "maps.npz")
    assert maps["cdam"].shape == (8, 2, 8, 8)
    assert "figures in" in capsys.readouterr().out


def test_demo_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        main(["demo", "--digits", "--images", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["demo", "--nodules", "0", "--out", str(tmp_path)])


@pytest.mark.slow
def test_lidc_demo_explains_every_biomarker_with_the_shipped_models(tmp_path, capsys):
    from lidc_cdam.models.demo_weights import shipped_checkpoint

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--nodules", "3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "NOT CT" in summary["note"] and "NOT CT" in capsys.readouterr().out
    assert summary["models"] == "shipped"
    assert summary["training"]["malignancy"]["checkpoint"] == str(shipped_checkpoint("phantom-malignancy"))
    assert len(summary["nodules"]) == 4  # three test nodules and the what-if nodule
    what_if = summary["nodules"][-1]
    assert what_if["nodule_id"] == f"{WHAT_IF[0]}-what-if"
    assert {k: what_if["biomarkers_rated"][k] for k in WHAT_IF[1]} == WHAT_IF[1]  # the changed ratings
    folds = pd.read_csv(manifest_path("lidc_folds.csv")).set_index("nodule_id")["fold"]
    assert folds[WHAT_IF[0]] == 0
    for nodule in summary["nodules"]:
        assert folds[nodule["nodule_id"].removesuffix("-what-if")] == 0  # test nodules: never seen in training
        assert 0 <= nodule["p_malignant"] <= 1
        assert set(nodule["biomarkers_predicted"]) == set(nodule["biomarkers_rated"])
        assert len(nodule["biomarkers_rated"]) == 8
        assert Path(nodule["figure"]).read_bytes()[:4] == b"\x89PNG"
    maps = np.load(out / "maps.npz")
    assert maps["cdam_malignancy"].shape == (4, 1, 16, 16) and maps["cdam_biomarkers"].shape == (4, 8, 16, 16)
    assert np.abs(maps["cdam_biomarkers"]).sum(axis=(2, 3)).min() > 0  # a map for every biomarker
    # the what-if nodule (calcified, ill-defined, part solid): calcification, margin, texture and diameter have
    # maps of their own, not one blob with a sign (the shipped models measured: |r| <= 0.78)
    names = summary["nodules"][-1]["biomarkers_rated"]
    own = [list(names).index(t) for t in ("calcification", "margin", "texture", "diameter_mm")]
    r = np.corrcoef(maps["cdam_biomarkers"][-1, own].reshape(len(own), -1))
    assert np.abs(r[np.triu_indices(len(own), 1)]).max() < 0.9


@pytest.mark.slow
def test_lidc_demo_retrain_trains_afresh_with_the_same_code(tmp_path):
    """``--retrain`` renders the phantoms and trains both models afresh with the trainer and the same
    configs as the shipped ones (here on 30 scans, to stay quick). That the malignancy model then beats
    the majority class is checked on 60 scans by
    ``test_train_lidc.py::test_malignancy_on_phantoms_learns_beyond_the_majority_class``."""
    from lidc_cdam.models.demo_weights import shipped_checkpoint

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--nodules", "2", "--scans", "30", "--retrain"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"].startswith("trained afresh")
    for task in ("malignancy", "biomarkers"):
        checkpoint = Path(summary["training"][task]["checkpoint"])
        assert checkpoint.is_file() and checkpoint != shipped_checkpoint(f"phantom-{task}")
        assert json.loads((checkpoint.parent / "result.json").read_text())["test_metrics"]
    assert len(summary["nodules"]) == 3  # two test nodules and the what-if nodule
