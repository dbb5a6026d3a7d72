"""`lidc-cdam train` on the phantom nodules with a tiny ViT: it learns, writes the 5-fold summary
with the baselines, and trains under torchrun (DDP, 2 CPU processes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from lidc_cdam.pipelines.cli import main

from lidc_cdam.models.loading import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from lidc_cdam.data.lidc.phantoms import build_phantoms

    folder = tmp_path_factory.mktemp("phantoms")
    build_phantoms(folder, n_scans=60, workers=2, progress=False)
    return folder


def test_malignancy_on_phantoms_learns_beyond_the_majority_class(phantoms, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", "tiny-phantom-malignancy", "--data", str(phantoms), "--folds", "0",
                 "--set", "epochs=10", "--out", str(out), "--no-progress"]) == 0
    history = pd.read_csv(out / "fold0" / "history.csv")
    assert history["val_loss"].min() < history["val_loss"].iloc[0]
    result = json.loads((out / "fold0" / "result.json").read_text())
    test = pd.read_csv(out / "fold0" / "test_predictions.csv")
    majority = max(test["true_malignant"].mean(), 1 - test["true_malignant"].mean())
    assert result["test_metrics"]["accuracy"] > majority
    model = load_model(out / "fold0" / "best.pt")
    assert model.meta["input_stats"]["image_size"] == 64 and model.meta["data"]["fold"] == 0
    assert "diameter threshold" in capsys.readouterr().out


def test_biomarkers_five_folds_write_the_summary(phantoms, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--config", "tiny-phantom-biomarkers", "--data", str(phantoms), "--set", "epochs=2",
                 "--out", str(out), "--no-progress"]) == 0
    per_fold = pd.read_csv(out / "per_fold.csv")
    assert set(per_fold["model"]) == {"tiny-phantom-biomarkers", "training mean"}
    assert sorted(per_fold["fold"].unique()) == [0, 1, 2, 3, 4]
    summary = pd.read_csv(out / "summary.csv", index_col=0)
    assert {"mse mean", "mse sd", "mse_diameter_mm mean"} <= set(summary.columns)
    model = load_model(out / "fold3" / "best.pt")
    assert model.task == "regression" and len(model.meta["target_stats"]["mean"]) == 8
    assert (out / "learning_curves.png").exists() and "± " in (out / "summary.md").read_text()


def test_bad_data_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--config", "tiny-phantom-malignancy", "--data", str(tmp_path)]) == 2
    assert "has no nodules.csv" in capsys.readouterr().err


def test_torchrun_trains_with_ddp_on_two_cpu_processes(phantoms, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    out = tmp_path / "ddp"
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "lidc_cdam.pipelines.cli", "train",
         "--config", "tiny-phantom-malignancy", "--data", str(phantoms), "--folds", "0", "--set", "epochs=2",
         "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(": cross-validation (malignancy)") == 1  # the summary comes from rank 0 only
    assert len(pd.read_csv(out / "fold0" / "history.csv")) == 2
    assert load_model(out / "fold0" / "best.pt").output_names == ["malignant"]


def test_sweep_command_ranks_the_grid(phantoms, tmp_path):
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", "tiny-phantom-malignancy", "--data", str(phantoms), "--folds", "0",
                 "--set", "epochs=1", "--vary", "trainable_blocks=[1,null]", "--out", str(out), "--no-progress"]) == 0
    table = pd.read_csv(out / "sweep.csv")
    assert len(table) == 2 and set(table["trainable_blocks"].fillna(-1)) == {1, -1}
    assert (out / "trainable_blocks=1" / "fold0" / "best.pt").exists()
