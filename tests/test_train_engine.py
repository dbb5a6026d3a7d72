"""The MONAI fine-tuning engine on a small learnable task: it learns, resumes exactly, freezes what
it should, writes checkpoints that reload to identical predictions, cross-validates with baselines,
sweeps, and runs under torchrun (DDP, gloo, 2 CPU processes)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from train_helpers import TINY_BACKBONE, ToyNodules, fold_data, toy_config

from lidc_cdam.models.loading import load_model, read_checkpoint
from lidc_cdam.train.config import TrainConfigError, config_from_dict, load_train_config
from lidc_cdam.train.cross_validation import run_cross_validation
from lidc_cdam.train.engine import train_fold
from lidc_cdam.train.sweep import grid_points, run_sweep


@pytest.fixture(scope="module")
def toy():
    return ToyNodules(120)


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("fold")
    config = toy_config(epochs=5)
    return config, out, train_fold(config, fold_data(toy, 0), out, progress=False)


def test_a_short_run_learns_and_scores_the_test_part(trained):
    _, out, result = trained
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3, 4, 5]
    assert history["val_loss"].iloc[-1] < history["val_loss"].iloc[0]
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    majority = 0.5 + abs(float(ToyNodules(120).label.mean()) - 0.5)
    assert result["test_metrics"]["accuracy"] > majority
    assert result["test_metrics"]["auc"] > 0.8
    assert history["lr"].iloc[1] == pytest.approx(history["lr"].iloc[0] * 0.9)  # exponential schedule
    predictions = pd.read_csv(out / "test_predictions.csv")
    assert len(predictions) == result["val_size"] and predictions["nodule_id"].str.startswith("toy").all()


def test_checkpoint_is_complete_and_reloads_to_identical_predictions(trained, toy):
    _, out, result = trained
    payload = read_checkpoint(out / "best.pt")  # weights_only=True
    assert payload["format"] == "lidc-cdam-checkpoint"
    model = load_model(out / "best.pt")
    assert model.task == "classification" and model.output_names == ["malignant"]
    assert model.meta["fold"] == 0 and model.meta["epoch"] == result["best_epoch"]
    assert model.meta["train_config"]["task"] == "malignancy" and "val_auc" in model.meta["val_metrics"]
    assert model.meta["input_stats"] == {"mean": 0.0, "std": 1.0}
    trust = payload["meta"]["trust"]  # trust flag statistics of the best model's training features (version 3)
    assert trust["version"] == 3 and trust["n_train"] == result["train_size"] and trust["dim"] == model.embed_dim
    assert payload["meta"]["trust_latent"]["n_train"] == result["train_size"]  # version 1, kept for comparison
    provenance = payload["meta"]["provenance"]  # what the model was trained on
    assert provenance["kind"] == "other" and provenance["fold"] == 0
    assert set(provenance) >= {"nodule_table_sha256", "counts", "preset", "code_version", "date"}
    assert provenance["code_version"].startswith("lidc-cdam ") and provenance["date"][:2] == "20"
    images = toy.image[:6]
    again = load_model(out / "best.pt")
    assert torch.equal(model(images), again(images))
    from lidc_cdam import explain

    assert explain(model, images, targets="malignant").maps.shape == (6, 1, 4, 4)


def test_an_interrupted_run_resumes_to_the_same_result(trained, toy, tmp_path):
    config, reference, _ = trained
    out = tmp_path / "fold"
    first = train_fold(config, fold_data(toy, 0), out, progress=False, stop_after_epochs=2)
    assert first["interrupted"] and not (out / "result.json").exists()
    result = train_fold(config, fold_data(toy, 0), out, progress=False)
    assert result["resumed_from_epoch"] == 2
    pd.testing.assert_frame_equal(pd.read_csv(out / "history.csv"), pd.read_csv(reference / "history.csv"))
    images = toy.image[:8]
    assert torch.equal(load_model(out / "best.pt")(images), load_model(reference / "best.pt")(images))


@pytest.mark.slow
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_mixed_precision_resumes_exactly_with_its_scaler(toy, tmp_path, amp):
    """fp16 trains with a gradient scaler whose scale is saved in state.pt and restored on resume (a fresh
    scaler would skip other steps); bf16 has none. Both run on the CPU here, as they would on a GPU."""
    config = toy_config(epochs=3, amp=amp)
    reference = train_fold(config, fold_data(toy, 0), tmp_path / "whole", progress=False)
    state = read_checkpoint(tmp_path / "whole" / "state.pt")
    assert state["precision"] == amp
    if amp == "fp16":
        assert 0 < state["scaler"]["scale"] < 65536.0  # backed off from its initial scale: it matters on resume
    else:
        assert state["scaler"] == {}
    train_fold(config, fold_data(toy, 0), tmp_path / "cut", progress=False, stop_after_epochs=1)
    resumed = train_fold(config, fold_data(toy, 0), tmp_path / "cut", progress=False)
    assert resumed["resumed_from_epoch"] == 1
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "cut" / "history.csv"),
                                  pd.read_csv(tmp_path / "whole" / "history.csv"))
    assert resumed["best"] == reference["best"]


def test_precision_policy(monkeypatch):
    from lidc_cdam.train.step import choose_precision

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert choose_precision(True, cpu).name == "fp32" and choose_precision("none", gpu).name == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    bf16 = choose_precision(True, gpu)
    assert bf16.name == "bf16" and bf16.scaler is None and bf16.device_type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    fp16 = choose_precision("auto", torch.device("cpu"))
    assert fp16.name == "fp32"
    fp16 = choose_precision("fp16", cpu)
    assert fp16.name == "fp16" and fp16.scaler is not None and fp16.state_dict()["scale"] == 65536.0
    with pytest.raises(TrainConfigError, match="amp must be"):
        toy_config(amp="fp8")


def test_resuming_another_config_is_refused(trained, toy, tmp_path):
    config, _, _ = trained
    train_fold(config, fold_data(toy, 0), tmp_path, progress=False, stop_after_epochs=1)
    with pytest.raises(ValueError, match="another config"):
        train_fold(config.with_changes(lr=1e-4), fold_data(toy, 0), tmp_path, progress=False)


def test_trainable_blocks_freeze_the_rest(toy, tmp_path):
    from lidc_cdam.train.backbones import build_model, set_trainable

    config = toy_config(epochs=1, trainable_blocks=1)
    before = build_model(config, ["malignant"])
    trainable = {n for n, p in before.named_parameters() if p in set(set_trainable(before, config))}
    assert trainable and all(n.startswith(("backbone.blocks.1.", "backbone.norm.", "head.")) for n in trainable)
    torch.manual_seed(0)
    train_fold(config, fold_data(toy, 1), tmp_path, progress=False)
    after = load_model(tmp_path / "best.pt")
    from monai.utils import set_determinism

    set_determinism(seed=config.seed)  # build_model draws the same initial weights
    initial = dict(build_model(config, ["malignant"]).named_parameters())
    for name, p in after.named_parameters():
        assert torch.equal(p, initial[name]) != (name in trainable), name
    last = toy_config(trainable_last_params=3)
    model = build_model(last, ["malignant"])
    assert len(set_trainable(model, last)) == 3 and sum(p.requires_grad for p in model.parameters()) == 3


def test_biomarker_regression_reports_mse_per_biomarker(toy, tmp_path):
    config = toy_config(task="biomarkers", loss="mse", epochs=3, schedule={"type": "cyclic", "base_lr": 1e-4,
                                                                          "max_lr": 2e-3, "step_size_up": 4})
    result = train_fold(config, fold_data(toy, 0, "biomarkers"), tmp_path, progress=False)
    history = pd.read_csv(tmp_path / "history.csv")
    names = fold_data(toy, 0, "biomarkers").output_names
    assert {f"val_mse_{n}" for n in names} <= set(history.columns)
    per_output = history[[f"val_mse_{n}" for n in names]].mean(axis=1).to_numpy()
    assert per_output == pytest.approx(history["val_mse"].to_numpy())
    assert history["val_mse"].iloc[-1] < history["val_mse"].iloc[0]
    assert set(result["test_metrics"]) == {"mse", *(f"mse_{n}" for n in names), "r2", *(f"r2_{n}" for n in names)}
    assert load_model(tmp_path / "best.pt").task == "regression"


def test_cross_validation_summary_with_baselines(toy, tmp_path):
    config = toy_config(epochs=2, folds=[0, 1, 2, 3, 4])
    per_fold = run_cross_validation(config, tmp_path, lambda f: fold_data(toy, f), toy.table(), toy.split,
                                    progress=False)
    assert set(per_fold["model"]) == {"toy", "diameter threshold", "logistic regression (8 biomarkers)"}
    assert (per_fold.groupby("model").size() == 5).all()
    summary = pd.read_csv(tmp_path / "summary.csv", index_col=0)
    assert summary.loc["toy", "accuracy mean"] == pytest.approx(per_fold[per_fold["model"] == "toy"]["accuracy"].mean())
    assert "± " in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    # finished folds are not trained again
    stamp = (tmp_path / "fold0" / "result.json").stat().st_mtime_ns
    run_cross_validation(config, tmp_path, lambda f: fold_data(toy, f), progress=False)
    assert (tmp_path / "fold0" / "result.json").stat().st_mtime_ns == stamp


def test_sweep_runs_every_grid_point(toy, tmp_path):
    grid = {"batch_size": [8, 16], "head_dropout": [0.0, 0.1]}
    assert len(grid_points(grid)) == 4
    config = toy_config(epochs=1, folds=[0])
    table = run_sweep(config, grid, tmp_path, lambda c, f: fold_data(toy, f), progress=False)
    assert len(table) == 4 and set(table.columns) >= {"batch_size", "head_dropout", "auc", "accuracy"}
    assert list(table["auc"]) == sorted(table["auc"], reverse=True)
    assert (tmp_path / "sweep.md").exists()
    with pytest.raises(TrainConfigError, match="non-empty list"):
        grid_points({"batch_size": []})


@pytest.mark.parametrize(("change", "message"), [
    ({"task": "survival"}, "task must be"),
    ({"task": "malignancy", "loss": "huber"}, "binary"),
    ({"backbone": {"name": "vit_small_patch16_224"}}, "has no weights"),
    ({"backbone": {**TINY_BACKBONE, "depth": 3}}, "unknown key"),
    ({"trainable_blocks": 2, "trainable_last_params": 5}, "not both"),
    ({"data": {"root": "d", "rotation": "sideways"}}, "data.rotation must be one of"),
    ({"target_weights": {"sphericity": 2.0}}, "not task 'malignancy'"),
    ({"task": "biomarkers", "target_weights": {"roundness": 2.0}}, "unknown: \\['roundness'\\]"),
    ({"task": "biomarkers", "target_weights": {"sphericity": 0.0}}, "must be positive"),
])
def test_config_errors(change, message):
    data = {"name": "x", "task": "malignancy", "backbone": TINY_BACKBONE, "data": {"root": "d"}, **change}
    with pytest.raises(TrainConfigError, match=message):
        config_from_dict(data, "x.yaml")


def test_presets_load_and_need_weights():
    from lidc_cdam.resources import config_dir

    for path in sorted(config_dir("train").glob("*.yaml")):
        name = path.stem
        if name.startswith(("tiny", "vit3d")):  # trained from scratch (no pretrained 3D ViT)
            config = load_train_config(path)
            assert config.backbone.random_init
            assert (config.data.view == "3d") == bool(config.backbone.monai_kwargs) == ("3d" in name)
            assert not name.startswith("vit3d") or (config.task in name and config.epochs == 50)
            continue
        with pytest.raises(TrainConfigError, match="no weights"):
            load_train_config(path)
        config = load_train_config(path, ["backbone.checkpoint=weights.pth"])
        assert config.task in name and config.epochs == 50


MONAI_3D = {"img_size": [32, 32, 32], "patch_size": [8, 8, 8], "hidden_size": 32, "mlp_dim": 64, "num_layers": 1,
            "num_heads": 2}


@pytest.mark.parametrize(("backbone", "data", "message"), [
    (TINY_BACKBONE, {"view": "3d"}, "needs a 3D backbone"),
    ({"random_init": True, "monai_kwargs": MONAI_3D}, {"view": "axial", "image_size": 32}, "needs data.view 3d"),
    ({"random_init": True, "monai_kwargs": MONAI_3D}, {"view": "3d", "image_size": 64}, "does not match"),
    ({"monai_kwargs": MONAI_3D}, {"view": "3d", "image_size": 32}, "random_init"),
    ({"random_init": True, "monai_kwargs": {**MONAI_3D, "in_channels": 3}}, {"view": "3d", "image_size": 32},
     "in_channels must be 1"),
    ({"random_init": True, "monai_kwargs": MONAI_3D, "drop_path_rate": 0.1}, {"view": "3d", "image_size": 32},
     "no drop path"),
])
def test_3d_config_errors(backbone, data, message):
    config = {"name": "x", "task": "malignancy", "backbone": backbone, "data": {"root": "d", **data}}
    with pytest.raises(TrainConfigError, match=message):
        config_from_dict(config, "x.yaml")


def test_3d_config_builds_a_monai_vit_with_our_head():
    from lidc_cdam.train.backbones import build_model, set_trainable

    config = config_from_dict({"name": "x", "task": "biomarkers", "trainable_blocks": 1,
                               "backbone": {"random_init": True, "monai_kwargs": {**MONAI_3D, "num_layers": 2}},
                               "data": {"root": "d", "view": "3d", "image_size": 32}}, "x.yaml")
    model = build_model(config, ["a", "b"])
    assert model.family == "MONAI ViT" and model.layout().grid == (4, 4, 4) and model.num_outputs == 2
    assert model.build["monai_kwargs"]["classification"] and model.in_chans == 1
    set_trainable(model, config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("backbone.blocks.1.") for n in trainable)
    assert not any(n.startswith(("backbone.blocks.0.", "backbone.patch_embedding.")) for n in trainable)


@pytest.mark.parametrize("trainable", [{}, {"trainable_blocks": 1}, {"trainable_last_params": 6}])
@pytest.mark.parametrize("view", ["2d", "3d"])
def test_every_trainable_parameter_gets_a_gradient(view, trainable):
    """DDP's default settings (no find_unused_parameters) fail at the 2nd iteration on a trainable parameter
    without a gradient: MONAI's ViT builds norm_cross_attn in every block and never uses it (issue 23)."""
    from lidc_cdam.train.backbones import build_model, set_trainable

    if view == "3d":
        config = config_from_dict({"name": "x", "task": "malignancy", **trainable,
                                   "backbone": {"random_init": True, "monai_kwargs": {**MONAI_3D, "num_layers": 2}},
                                   "data": {"root": "d", "view": "3d", "image_size": 32}}, "x.yaml")
        images = torch.randn(2, 1, 32, 32, 32)
    else:
        config, images = toy_config(**trainable), torch.randn(2, 3, 32, 32)
    model = build_model(config, ["malignant"]).train()
    params = set_trainable(model, config)
    assert params and all(p.requires_grad for p in params)
    model(images).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"trainable but unused: {missing}"
    if "trainable_last_params" in trainable:
        assert len(params) == 6


DDP_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {root!r})
from train_helpers import ToyNodules, ToyVolumes, fold_data, toy_config, toy_config_3d
from lidc_cdam.train.engine import current_process, train_fold
process = current_process("cpu")
if {view!r} == "3d":  # MONAI's ViT: its unused norm_cross_attn failed DDP at the 2nd iteration (issue 23)
    config, data = toy_config_3d(epochs=2, batch_size=8), fold_data(ToyVolumes(40), 0)
else:
    config, data = toy_config(epochs=3), fold_data(ToyNodules(120), 0)
result = train_fold(config, data, {out!r}, progress=False, process=process)
print("RANK", process.rank, process.world, json.dumps(result.get("test_metrics", {{}})))
"""


@pytest.mark.slow
@pytest.mark.parametrize("view", ["2d", "3d"])
def test_torchrun_ddp_with_two_cpu_processes(tmp_path, view):
    from helpers import torchrun

    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(root=str(Path(__file__).resolve().parent), out=str(tmp_path / "out"),
                                        view=view))
    result = subprocess.run([*torchrun(2), str(script)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RANK 0 2" in result.stdout and "RANK 1 2" in result.stdout
    history = pd.read_csv(tmp_path / "out" / "history.csv")
    assert len(history) == (3 if view == "2d" else 2)
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert load_model(tmp_path / "out" / "best.pt").output_names == ["malignant"]
    if view == "2d":
        assert history["val_loss"].iloc[-1] < history["val_loss"].iloc[0]
        assert saved["train_size"] == 72 and saved["test_metrics"]["accuracy"] > 0.5
    else:
        assert saved["train_size"] == 24 and load_model(tmp_path / "out" / "best.pt").layout().grid == (2, 2, 2)


BROKEN_RANK_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {root!r})
from train_helpers import ToyNodules, fold_data, toy_config
from lidc_cdam.train.engine import current_process, train_fold


class Broken(ToyNodules):  # rank 1 meets a broken item in the middle of an epoch
    def item(self, i, task):
        if int(os.environ["RANK"]) == 1 and i == self.ids.index("toy052"):
            raise ValueError("broken crop toy052 on rank 1")
        return super().item(i, task)


process = current_process("cpu")
train_fold(toy_config(epochs=3), fold_data(Broken(120), 0), {out!r}, progress=False, process=process)
"""


@pytest.mark.slow
def test_torchrun_an_error_mid_epoch_on_one_rank_ends_every_rank(tmp_path):
    """DDP training (2 gloo processes): an error on one rank in the middle of an epoch ends both ranks, with the
    error's message, well before any collective timeout (torchrun's agent stops the others; nothing hangs)."""
    import time

    from helpers import torchrun

    script = tmp_path / "broken.py"
    script.write_text(BROKEN_RANK_SCRIPT.format(root=str(Path(__file__).resolve().parent), out=str(tmp_path / "out")))
    start = time.monotonic()
    result = subprocess.run([*torchrun(2), str(script)], capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0 and time.monotonic() - start < 200
    assert "broken crop toy052 on rank 1" in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out" / "result.json").exists()  # the run did not pretend to finish


def test_a_timm_backbone_by_name_starts_from_the_local_weights_file(tmp_path):
    import timm

    from lidc_cdam.train.backbones import build_model

    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0)
    torch.save(reference.state_dict(), tmp_path / "weights.pth")
    config = toy_config(backbone={"name": "vit_tiny_patch16_224", "checkpoint": str(tmp_path / "weights.pth"),
                                  "timm_kwargs": {"img_size": 32}, "drop_rate": 0.1})
    model = build_model(config, ["malignant"])
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[name], tensor), name
    assert model.backbone.pos_drop.p == 0.1 and model.backbone.blocks[0].mlp.drop1.p == 0.1
    assert model.head.out_features == 1
    assert model.build["timm_name"] == "vit_tiny_patch16_224"


def test_target_weights_weigh_each_biomarkers_loss():
    from lidc_cdam.train.engine import WeightedTargetLoss, _loss

    pred, target = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), torch.zeros(6, 3)
    plain = WeightedTargetLoss(torch.nn.MSELoss(reduction="none"), [1.0, 1.0, 1.0])
    torch.testing.assert_close(plain(pred, target), torch.nn.MSELoss()(pred, target))
    per_target = (pred ** 2).mean(0)
    weighted = WeightedTargetLoss(torch.nn.MSELoss(reduction="none"), [1.0, 3.0, 1.0])
    torch.testing.assert_close(weighted(pred, target), (per_target * torch.tensor([1.0, 3.0, 1.0])).sum() / 5)
    config = config_from_dict({"name": "x", "task": "biomarkers", "loss": "mse", "backbone": TINY_BACKBONE,
                               "data": {"root": "d"}, "target_weights": {"sphericity": 3.0}}, "x.yaml")
    loss = _loss(config, ["subtlety", "sphericity", "texture"])
    torch.testing.assert_close(loss(pred, target), weighted(pred, target))
    assert isinstance(_loss(toy_config()), torch.nn.BCEWithLogitsLoss)  # no weights: the plain loss


def test_a_weighted_biomarker_run_trains_and_records_the_weighted_validation_loss(toy, tmp_path):
    weights = {"sphericity": 4.0, "texture": 2.0}
    config = toy_config(task="biomarkers", loss="mse", epochs=2, target_weights=weights)
    train_fold(config, fold_data(toy, 0, "biomarkers"), tmp_path, progress=False)
    history = pd.read_csv(tmp_path / "history.csv")
    names = fold_data(toy, 0, "biomarkers").output_names
    w = np.array([weights.get(n, 1.0) for n in names])
    weighted = history[[f"val_mse_{n}" for n in names]].to_numpy() @ (w / w.sum())
    assert weighted == pytest.approx(history["val_loss"].to_numpy(), rel=1e-4)
