"""`lidc-cdam train` on the phantom nodules with a tiny ViT: it learns, writes the 5-fold summary
with the baselines, and trains under torchrun (DDP, 2 CPU processes)."""

from __future__ import annotations

import json
import os
import subprocess
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


@pytest.mark.xfail(reason="issue 22: a malignancy model trained here on 60 phantom scans is one nodule from the "
                          "majority class (render 5: accuracy 0.86 against 0.82 on 22 test nodules; render 4: 0.82); "
                          "the margin is too thin for a model trained in the test on another CPU",
                   strict=False)
def test_malignancy_on_phantoms_learns_beyond_the_majority_class(phantoms, tmp_path, capsys):
    from helpers import from_the_shipped_biomarker_model

    out = tmp_path / "run"
    assert main(["train", "--config", "tiny-phantom-malignancy", "--data", str(phantoms), "--folds", "0",
                 "--set", "epochs=10", "--set", from_the_shipped_biomarker_model(), "--out", str(out),
                 "--no-progress"]) == 0
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
                 "--set", "data.variants=false", "--out", str(out), "--no-progress"]) == 0
    per_fold = pd.read_csv(out / "per_fold.csv")
    assert set(per_fold["model"]) == {"tiny-phantom-biomarkers", "training mean"}
    assert sorted(per_fold["fold"].unique()) == [0, 1, 2, 3, 4]
    summary = pd.read_csv(out / "summary.csv", index_col=0)
    assert {"mse mean", "mse sd", "mse_diameter_mm mean"} <= set(summary.columns)
    model = load_model(out / "fold3" / "best.pt")
    assert model.task == "regression" and len(model.meta["target_stats"]["mean"]) == 8
    assert (out / "learning_curves.png").exists() and "± " in (out / "summary.md").read_text()


def test_3d_preset_trains_on_phantom_volumes_and_its_checkpoint_explains_them(phantoms, tmp_path):
    """tiny3d-phantom-malignancy: the whole 32^3 crop into a MONAI 3D ViT through the same trainer and folds; the
    checkpoint records view "3d" and image size 32, rebuilds its test inputs from them and gives [4, 4, 4] maps."""
    import torch

    from lidc_cdam import explain
    from lidc_cdam.data.lidc.datasets import checkpoint_dataset

    out = tmp_path / "run3d"
    assert main(["train", "--config", "tiny3d-phantom-malignancy", "--data", str(phantoms), "--folds", "0",
                 "--set", "epochs=6", "--out", str(out), "--no-progress"]) == 0
    history = pd.read_csv(out / "fold0" / "history.csv")
    assert len(history) == 6 and history["val_loss"].min() < history["val_loss"].iloc[0]
    model = load_model(out / "fold0" / "best.pt")
    stats = model.meta["input_stats"]
    assert model.family == "MONAI ViT" and stats["view"] == "3d" and stats["image_size"] == 32
    test = pd.read_csv(out / "fold0" / "test_predictions.csv")
    items = checkpoint_dataset(phantoms, test["nodule_id"].tolist()[:4], stats)
    volumes = torch.stack([items[i]["image"] for i in range(4)])
    assert volumes.shape == (4, 1, 32, 32, 32)
    attr = explain(model, volumes, [0])
    assert attr.maps.shape == (4, 1, 4, 4, 4) and attr.upsample().shape == (4, 1, 32, 32, 32)
    with torch.no_grad():
        logits = model(volumes)[:, 0]
    torch.testing.assert_close(attr.scores[:, 0], logits, rtol=1e-5, atol=1e-5)
    recorded = torch.tensor(test["pred_malignant"].to_numpy()[:4], dtype=torch.float32)  # the trainer's test logits
    torch.testing.assert_close(logits, recorded, rtol=1e-4, atol=1e-4)


def test_bad_data_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--config", "tiny-phantom-malignancy", "--data", str(tmp_path)]) == 2
    assert "has no nodules.csv" in capsys.readouterr().err


def test_torchrun_trains_with_ddp_on_two_cpu_processes(phantoms, tmp_path):
    from helpers import torchrun

    out = tmp_path / "ddp"
    result = subprocess.run(
        [*torchrun(2), "-m", "lidc_cdam.pipelines.cli", "train",
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
