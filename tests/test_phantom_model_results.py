"""The committed 5-fold results of the phantom presets (benchmarks/results/train-phantoms/): the per-fold tables
follow from the committed test predictions, fold 0's are the shipped models' recorded metrics, and the shipped
weights give those predictions again on freshly rendered phantoms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lidc_cdam.models.demo_weights import shipped_checkpoint, shipped_manifest
from lidc_cdam.train.engine import task_metrics

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "train-phantoms"
RUNS = {  # committed folder -> (preset, shipped model, task as the trainer names it)
    "tiny-bio": ("tiny-phantom-biomarkers", "phantom-biomarkers", "biomarkers"),
    "tiny-mal": ("tiny-phantom-malignancy", "phantom-malignancy", "malignancy"),
}
FOLDS = range(5)


def predictions(run: str, fold: int) -> pd.DataFrame:
    return pd.read_csv(RESULTS / run / "test_predictions" / f"fold{fold}.csv")


def metrics_of(frame: pd.DataFrame, task: str) -> dict[str, float]:
    """The trainer's test metrics (:func:`lidc_cdam.train.engine.task_metrics`) of a predictions table."""
    names = [c.removeprefix("true_") for c in frame.columns if c.startswith("true_")]
    outputs = torch.tensor(frame[[f"pred_{n}" for n in names]].to_numpy(np.float32))
    labels = torch.tensor(frame[[f"true_{n}" for n in names]].to_numpy(np.float32))
    return task_metrics(outputs, labels, task, names)


@pytest.mark.parametrize("run", sorted(RUNS))
def test_the_committed_tables_follow_from_the_committed_predictions(run):
    preset, shipped, task = RUNS[run]
    per_fold = pd.read_csv(RESULTS / run / "per_fold.csv")
    model_rows = per_fold[per_fold["model"] == preset].set_index("fold")
    assert sorted(model_rows.index) == list(FOLDS)
    for fold in FOLDS:
        found = metrics_of(predictions(run, fold), task)
        for key, value in found.items():
            assert value == pytest.approx(model_rows.loc[fold, key], rel=1e-4, abs=1e-5), (run, fold, key)
    recorded = shipped_manifest()[shipped]["test_metrics"]["test_metrics"]
    for key, value in metrics_of(predictions(run, 0), task).items():
        assert value == pytest.approx(recorded[key], rel=1e-4, abs=1e-5), (shipped, key)
    summary = pd.read_csv(RESULTS / run / "summary.csv", index_col=0)
    key = "r2" if task == "biomarkers" else "auc"
    assert summary.loc[preset, f"{key} mean"] == pytest.approx(model_rows[key].mean(), rel=1e-6)


def test_the_malignancy_model_is_above_the_diameter_threshold_on_every_fold():
    """What the READMEs say of the committed malignancy runs (the threshold on the same test parts)."""
    per_fold = pd.read_csv(RESULTS / "tiny-mal" / "per_fold.csv")
    auc = per_fold.pivot(index="fold", columns="model", values="auc")
    assert (auc["tiny-phantom-malignancy"] > auc["diameter threshold"]).all()


@pytest.mark.slow
def test_the_shipped_models_predict_their_committed_fold0_predictions_again(tmp_path):
    """Phantoms of the first twelve scans with fold-0 test nodules, rendered here; the shipped weights' predictions
    on them equal the committed ones of the run they were shipped from (standardised units / logits, 1e-3)."""
    from lidc_cdam.data.lidc.datasets import checkpoint_dataset
    from lidc_cdam.data.lidc.folds import read_folds, split
    from lidc_cdam.data.lidc.phantoms import build_phantoms
    from lidc_cdam.models.loading import load_model, read_checkpoint
    from lidc_cdam.train.engine import predict

    committed = {run: predictions(run, 0).set_index("nodule_id") for run in RUNS}
    test_ids = split(read_folds(), 0)["test"]
    patients = sorted({i.split("_s")[0] for i in test_ids})[:12]
    build_phantoms(tmp_path, scans=patients, workers=2, progress=False)
    rendered = set(pd.read_csv(tmp_path / "nodules.csv")["nodule_id"])
    ids = [i for i in test_ids if i in rendered]
    assert len(ids) >= 12 and set(ids) <= set(committed["tiny-bio"].index)
    for run, (_, shipped, _) in RUNS.items():
        path = shipped_checkpoint(shipped)
        model, meta = load_model(path), read_checkpoint(path)["meta"]
        task = "classification" if model.task == "classification" else "regression"
        dataset = checkpoint_dataset(tmp_path, ids, meta["input_stats"], task=task,
                                     target_stats=meta.get("target_stats"))
        outputs, labels, got_ids = predict(model, dataset, 16, torch.device("cpu"))
        assert list(got_ids) == ids
        names = list(model.output_names)
        want = committed[run].loc[ids]
        np.testing.assert_allclose(labels.numpy(), want[[f"true_{n}" for n in names]].to_numpy(), atol=1e-5)
        np.testing.assert_allclose(outputs.numpy(), want[[f"pred_{n}" for n in names]].to_numpy(), atol=1e-3,
                                   err_msg=run)
