"""``ship_demo_weights --from-runs``: only a finished run of the preset, on the current rendering, is shipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lidc_cdam.pipelines.ship_demo_weights import check_preset_run, check_same_fold_start

from lidc_cdam.data.lidc.phantom_render import RENDER_VERSION
from lidc_cdam.resources import config_dir
from lidc_cdam.train.config import load_train_config


def _run(tmp_path: Path, task: str, render_version: int = RENDER_VERSION, **changes) -> Path:
    phantoms = tmp_path / "phantoms"
    phantoms.mkdir(parents=True, exist_ok=True)
    (phantoms / "summary.json").write_text(json.dumps({"settings": {"render_version": render_version}}))
    config = load_train_config(config_dir("train") / f"tiny-phantom-{task}.yaml", [f"data.root={phantoms}",
                                                                                  "folds=[0]"]).to_dict()
    config.update(changes)
    run = tmp_path / f"run-{task}"
    (run / "fold0").mkdir(parents=True)
    for name in ("fold0/best.pt", "fold0/result.json"):
        (run / name).write_bytes(b"")
    metric = "auc" if task == "malignancy" else "r2"
    rows = [f"tiny-phantom-{task},{fold},{fold / 10}" for fold in (2, 0)]  # the last call trained fold 2
    (run / "per_fold.csv").write_text(f"model,fold,{metric}\n" + "\n".join(rows) + "\n")
    (run / "summary.json").write_text(json.dumps({"config": {**config, "folds": [2]}}))
    return run


@pytest.mark.parametrize("task", ["biomarkers", "malignancy"])
def test_a_run_of_the_preset_is_taken(tmp_path, task):
    run = _run(tmp_path, task)
    found = check_preset_run(run, task)
    assert found["checkpoint"] == run / "fold0" / "best.pt"
    # the shipped summary is fold 0's, whatever folds the run's last call trained
    assert found["summary"].splitlines()[0] == f"# tiny-phantom-{task}: cross-validation ({task}), fold 0"
    metric = "auc" if task == "malignancy" else "r2"
    assert f"| {metric} | folds |" in found["summary"]
    assert f"| tiny-phantom-{task} | 0.000 | 1 |" in found["summary"]
    assert found["config"]["data"]["root"] == str(tmp_path / "phantoms")


def test_a_run_of_another_recipe_or_rendering_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"summary.json: not the tiny-phantom-biomarkers preset \(differs in epochs\)"):
        check_preset_run(_run(tmp_path / "a", "biomarkers", epochs=3), "biomarkers")
    old = RENDER_VERSION - 1
    with pytest.raises(ValueError, match=f"render version {old}, not the current {RENDER_VERSION}"):
        check_preset_run(_run(tmp_path / "b", "biomarkers", render_version=old), "biomarkers")
    unfinished = _run(tmp_path / "c", "malignancy")
    (unfinished / "per_fold.csv").unlink()
    with pytest.raises(ValueError, match=r"per_fold\.csv: missing"):
        check_preset_run(unfinished, "malignancy")
    without_fold0 = _run(tmp_path / "d", "biomarkers")
    (without_fold0 / "per_fold.csv").write_text("model,fold,r2\ntiny-phantom-biomarkers,2,0.7\n")
    with pytest.raises(ValueError, match=r"per_fold\.csv: no row for fold 0 \(folds \[2\]\).*--folds 0-4"):
        check_preset_run(without_fold0, "biomarkers")


def test_the_malignancy_run_must_start_from_the_shipped_biomarker_run(tmp_path):
    bio = check_preset_run(_run(tmp_path, "biomarkers"), "biomarkers")
    start = {"checkpoint": str(tmp_path / "run-biomarkers" / "fold{fold}" / "best.pt")}
    check_same_fold_start({"biomarkers": bio, "malignancy": {"config": {"backbone": start}}})
    with pytest.raises(ValueError, match="started from 'scratch', not from the biomarker run's"):
        check_same_fold_start({"biomarkers": bio, "malignancy": {"config": {"backbone": {"checkpoint": None}}}})
