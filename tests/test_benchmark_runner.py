"""The benchmark runner: config checks, the tidy table against a direct computation, resume,
torchrun sharding (2 CPU processes), skip-and-report, tables and figures."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from lidc_cdam import ViTModel
from lidc_cdam.evaluate.benchmark_config import ConfigError, load_config
from lidc_cdam.evaluate.image_sets import open_image_set
from lidc_cdam.evaluate.metrics import evaluate_image
from lidc_cdam.evaluate.perturbation import gaussian_blur
from lidc_cdam.evaluate.runner import run_benchmark
from lidc_cdam.explain.api import explain
from lidc_cdam.models.loading import save_checkpoint

METHODS = {"cdam": {}, "smooth-cdam": {"n": 4, "sigma": 0.05, "seed": 0}, "attention": {}, "intgrad": {"n": 4}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random ViT for 64 px images (4 x 4 patches of 16 px), 10 digit classes."""
    torch.manual_seed(3)
    model = ViTModel.from_config(dict(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                                      num_classes=0), head_outputs=10)
    with torch.no_grad():
        for blk in model.backbone.blocks:
            blk.attn.qkv.weight.mul_(4.0)
        model.head[1].weight.mul_(10.0)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_checkpoint(model, path)
    return path


def write_config(folder: Path, checkpoint: Path, **changes) -> Path:
    config = {
        "name": "tiny",
        "model": {"source": "checkpoint", "checkpoint": str(checkpoint)},
        "image_sets": [{"name": "digits", "source": "multi-digits", "n": 6, "seed": 5, "split": "test"}],
        "methods": METHODS,
        # box sides 16..48 px: smaller than the 64 px images (4 x 16 px would cover them)
        "metrics": {"percents": [0, 25, 50, 75], "box_sizes": [1, 2, 3], "n_boxes": 10, "blur_sigma": 4.0},
        "randomization": {"images": 2, "n_blocks": 1},
        "batch_images": 2,
        **changes,
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def sorted_metrics(out: Path) -> pd.DataFrame:
    frame = pd.read_parquet(out / "metrics.parquet").drop(columns="explain_seconds")
    return frame.sort_values(["image_set", "image_id", "method"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, checkpoint):
    folder = tmp_path_factory.mktemp("bench")
    config = load_config(write_config(folder, checkpoint))
    summary = run_benchmark(config, folder / "out", progress=False)
    return config, folder / "out", summary


def test_tidy_table_equals_a_direct_computation(finished_run):
    config, out, _ = finished_run
    metrics = pd.read_csv(out / "metrics.csv")
    assert len(metrics) == 6 * len(METHODS)
    assert set(metrics["method"]) == set(METHODS)
    model = load_model_for(config)
    images = open_image_set(config.image_sets[0], model, {"size": 64})
    item = images.load(3)
    row = metrics[(metrics["image_id"] == item.image_id) & (metrics["method"] == "cdam")].iloc[0]
    assert {row["c1"], row["c2"]} == set(item.classes)
    maps = explain(model, item.image[None], [[int(row["c1"]), int(row["c2"])]], method="cdam")
    from lidc_cdam.evaluate.runner import _box_generator

    direct = evaluate_image(
        lambda x: model(x).detach(), item.image, gaussian_blur(item.image[None], 4.0)[0],
        {"cdam": maps.upsample()[0]}, int(row["c1"]), patch=16, native_maps={"cdam": maps.maps[0]},
        box_sizes=[1, 2, 3], n_boxes=10, generator=_box_generator(0, item.image_id), percents=[0, 25, 50, 75],
    )["cdam"]
    assert row["a_lif_mif"] == pytest.approx(direct.fidelity, rel=1e-5, abs=1e-4)
    assert row["a_box"] == pytest.approx(direct.a_box, rel=1e-5, abs=1e-6)
    assert row["delta_a_box"] == pytest.approx(direct.delta_box, rel=1e-5, abs=1e-6)
    assert row["compactness"] == pytest.approx(direct.compactness)
    # localisation columns from the object masks; attention ignores the target: zero Deltas
    assert metrics["share_in_own_mask"].between(0, 1).all()
    attention = metrics[metrics["method"] == "attention"]
    assert (attention["delta_a_lif_mif"].abs() < 1e-9).all() and (attention["delta_a_box"].abs() < 1e-9).all()


def test_metric_work_stays_on_the_device(finished_run, monkeypatch):
    """Images, maps, blurred images, box masks and scores stay where the model is until the part's rows are
    made: one host copy per part (the targets' logits), not one per scored batch, map or image (issue 23)."""
    from lidc_cdam.evaluate import perturbation
    from lidc_cdam.evaluate.runner import evaluate_part

    config, _, _ = finished_run
    model = load_model_for(config)
    items = [x for x in (open_image_set(config.image_sets[0], model, {"size": 64}).load(i) for i in range(2))]
    copies, masks_on = [], []
    real_cpu, real_box_masks = torch.Tensor.cpu, perturbation.box_masks
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: copies.append(tuple(self.shape))
                        or real_cpu(self, *a, **k))

    def box_masks(*args, device=None, **kwargs):
        masks_on.append(device)
        return real_box_masks(*args, device=device, **kwargs)

    monkeypatch.setattr("lidc_cdam.evaluate.metrics.box_masks", box_masks)
    rows, curves = evaluate_part(model, config, items, torch.device("cpu"))
    assert len(rows) == 2 * len(METHODS) and curves
    assert copies == [(2, 10)], copies
    assert masks_on == [torch.device("cpu")] * 2  # built on the images' device


def test_box_masks_are_built_on_the_given_device():
    from lidc_cdam.evaluate.perturbation import box_masks, sample_boxes

    corners = sample_boxes((32, 32), 8, [1, 2], 5, torch.Generator().manual_seed(0))
    on_meta = box_masks(corners, [1, 2], 8, (32, 32), device="meta")
    assert on_meta.device.type == "meta" and on_meta.shape == (2, 5, 32, 32)
    assert torch.equal(box_masks(corners, [1, 2], 8, (32, 32), device="cpu"), box_masks(corners, [1, 2], 8, (32, 32)))


def load_model_for(config):
    from lidc_cdam.evaluate.runner import load_benchmark_model

    return load_benchmark_model(config)[0].eval()


def test_report_tables_and_figures(finished_run):
    _, out, summary = finished_run
    text = (out / "tables.md").read_text()
    for heading in ("Fidelity", "Class discrimination", "Compactness", "Localisation", "Model-randomisation"):
        assert heading in text
    assert "| cdam |" in text
    for name in ("digits_fidelity", "digits_box_sensitivity", "digits_class_discrimination"):
        png = out / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fidelity = pd.read_csv(out / "tables" / "digits_fidelity.csv", index_col="method")
    metrics = pd.read_csv(out / "metrics.csv")
    assert fidelity.loc["cdam", "A_LIF-MIF ↑ mean"] == pytest.approx(
        metrics.loc[metrics["method"] == "cdam", "a_lif_mif"].mean())
    randomization = pd.read_csv(out / "randomization.csv")
    assert set(randomization["method"]) == set(METHODS)
    # attention does not read the head: unchanged after randomising it, so it fails the check
    assert summary["randomization"]["attention"].startswith("fails")
    curves = pd.read_parquet(out / "curves.parquet")
    assert set(curves["curve"]) == {"mif", "lif", "f_box", "mif_prime", "lif_prime", "f_box_prime"}


def test_interrupted_run_resumes_to_the_same_result_without_recomputing(tmp_path, checkpoint, finished_run):
    _, reference, _ = finished_run
    config = load_config(write_config(tmp_path, checkpoint))
    out = tmp_path / "out"
    assert run_benchmark(config, out, progress=False, max_parts=1) is None  # "killed" after one part
    first = out / "parts" / "digits" / "part_00000.json"
    stamp = first.stat().st_mtime_ns
    assert not (out / "metrics.parquet").exists()
    run_benchmark(config, out, progress=False)
    assert first.stat().st_mtime_ns == stamp  # not recomputed
    pd.testing.assert_frame_equal(sorted_metrics(out), sorted_metrics(reference))


def test_resuming_with_another_config_is_refused(tmp_path, checkpoint):
    out = tmp_path / "out"
    config = load_config(write_config(tmp_path, checkpoint, randomization={"images": 0}))
    run_benchmark(config, out, progress=False, max_parts=1)
    other = load_config(write_config(tmp_path, checkpoint, randomization={"images": 0}, batch_images=3))
    with pytest.raises(ConfigError, match="another config"):
        run_benchmark(other, out, progress=False)
    run_benchmark(other, out, progress=False, restart=True)
    assert len(pd.read_csv(out / "metrics.csv")) == 6 * len(METHODS)


def test_unreadable_images_are_skipped_and_reported(tmp_path, checkpoint):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray((torch.rand(40, 50, 3) * 255).byte().numpy()).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    config = load_config(write_config(tmp_path, checkpoint, randomization={"images": 0}, image_sets=[
        {"name": "photos", "source": "folder", "root": str(folder), "targets": "predicted"}]))
    summary = run_benchmark(config, tmp_path / "out", progress=False)
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv")
    assert list(skipped["reason"].str.contains("broken.png")) == [True]
    metrics = pd.read_csv(tmp_path / "out" / "metrics.csv")
    assert sorted(metrics["image_id"].unique()) == ["img0.png", "img1.png", "img2.png"]
    assert (metrics["c2"] == -1).all() and metrics["delta_a_box"].isna().all()
    assert summary["image_sets"]["photos"]["skipped"] == 1
    assert "Class discrimination" not in (tmp_path / "out" / "tables.md").read_text()


@pytest.mark.parametrize(("change", "message"), [
    ({"methods": {"cdam": {}, "magic": {}}}, "unknown method 'magic'"),
    ({"methods": {"smoothgrad": {"n": 2, "noise": 1}}}, "unknown option"),
    ({"model": {"source": "checkpoint"}}, "model.checkpoint is not set"),
    ({"metrics": {"percnts": [0]}}, "unknown key"),
    ({"image_sets": [{"name": "a", "source": "imagenet", "manifest": "x.csv"}]}, "root is not set"),
])
def test_config_errors_name_the_file_and_the_problem(tmp_path, checkpoint, change, message):
    path = write_config(tmp_path, checkpoint, **change)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_a_box_covering_the_model_images_is_a_config_error_before_any_work(tmp_path, checkpoint):
    """Patch 16 on 64 px images: box size 4 (64 px) would cover the image; the runner refuses the
    config once it knows the model, before writing anything (no size is silently dropped)."""
    path = write_config(tmp_path, checkpoint, metrics={"box_sizes": [1, 2, 4], "n_boxes": 10})
    config = load_config(path)  # the model is not known yet
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"metrics\.box_sizes: box size 4 \(side 4 x 16 = 64 px.*would cover "
                                          r"the 64x64 images.*at most 3 patches") as err:
        run_benchmark(config, out, progress=False)
    assert str(path) in str(err.value)
    assert not (out / "run.json").exists() and not (out / "parts").exists()
    # the same through the CLI: exit code 2 and the message
    from lidc_cdam.pipelines.cli import main

    assert main(["benchmark", "--config", str(path), "--out", str(out), "--no-progress"]) == 2
    assert not (out / "run.json").exists()


def test_overrides_and_presets_load():
    from lidc_cdam.pipelines.benchmark import resolve_config_path

    offline = load_config(resolve_config_path("offline-multi-object"))
    assert len(offline.methods) == 10 and offline.model.source == "demo"
    with pytest.raises(ConfigError, match=r"model\.checkpoint"):
        load_config(resolve_config_path("paper-imagenet"))
    paper = load_config(resolve_config_path("paper-imagenet"), [
        "model.checkpoint=probe.pt", "image_sets.xval.root=/data/val", "image_sets.xmulti.root=/data/val"])
    assert paper.model.checkpoint == "probe.pt" and paper.image_sets[1].root == "/data/val"
    assert paper.metrics.box_sizes == list(range(1, 28)) and paper.metrics.blur_sigma == 14.0
    assert all(paper.methods[m]["n"] == 50 for m in ("smooth-cdam", "integrated-cdam", "smoothgrad", "intgrad"))


def test_cli_reports_config_errors(tmp_path, checkpoint, capsys):
    from lidc_cdam.pipelines.cli import main

    path = write_config(tmp_path, checkpoint, methods={"nope": {}})
    assert main(["benchmark", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes_give_the_single_process_table(tmp_path, checkpoint, finished_run):
    from helpers import torchrun

    _, reference, _ = finished_run
    path = write_config(tmp_path, checkpoint)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*torchrun(2), "-m", "lidc_cdam.pipelines.cli",
         "benchmark", "--config", str(path), "--out", str(out), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Fidelity" in result.stdout  # rank 0 printed the tables once
    assert result.stdout.count("# Benchmark") == 1
    parts = sorted((out / "parts" / "digits").glob("part_*.json"))
    assert len(parts) == 3
    pd.testing.assert_frame_equal(sorted_metrics(out), sorted_metrics(reference))


@pytest.mark.slow
def test_torchrun_an_error_on_one_rank_ends_every_rank_with_its_message(tmp_path, checkpoint):
    """Only rank 0 checks the output folder: its ConfigError used to leave rank 1 waiting at a barrier (on NCCL)
    or crashing with "Connection closed by peer" (gloo). Now both ranks stop with the message (issue 23)."""
    import time

    from helpers import torchrun

    path = write_config(tmp_path, checkpoint)
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text('{"fingerprint": "another", "config_file": "other.yaml"}')
    start = time.perf_counter()
    result = subprocess.run(
        [*torchrun(2), "-m", "lidc_cdam.pipelines.cli", "benchmark", "--config", str(path), "--out", str(out),
         "--no-progress", "--device", "cpu"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode != 0 and time.perf_counter() - start < 120
    assert result.stderr.count("lidc-cdam benchmark: error: ") == 2, result.stderr[-3000:]
    assert result.stderr.count("holds results of another config (other.yaml") == 2
    assert "Connection closed" not in result.stderr


@pytest.mark.slow
@pytest.mark.committed_results
def test_offline_preset_reproduces_the_committed_results(tmp_path, demo_model):
    """The first part (8 images, all ten methods) of the offline preset, recomputed with the shipped
    digits model, equals the committed table in benchmarks/results/offline-multi-object (which was
    computed from the same shipped weights).

    Under the kernel-set check (``KERNEL_SUBSET``): the first image and the eight unseeded methods (a row depends
    on no other image or method; the seeded ones draw their noise for the whole batch of 8)."""
    from helpers import KERNEL_SUBSET
    from lidc_cdam.pipelines.benchmark import resolve_config_path

    from lidc_cdam.evaluate.runner import evaluate_part
    from lidc_cdam.train.digits import DigitsTrainConfig

    committed = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "offline-multi-object"
    config = load_config(resolve_config_path("offline-multi-object"))
    if KERNEL_SUBSET:
        config.methods = {m: o for m, o in config.methods.items() if "seed" not in o}
        images = open_image_set(config.image_sets[0], demo_model[0], DigitsTrainConfig().data_kwargs())
        rows, _ = evaluate_part(demo_model[0], config, [images.load(0)], torch.device("cpu"))
        part, n_rows = pd.DataFrame(rows).assign(image_set=config.image_sets[0].name), 1 * 8
    else:
        assert run_benchmark(config, tmp_path, progress=False, max_parts=1) is None
        part = pd.read_parquet(tmp_path / "parts" / "multi_digits" / "part_00000.metrics.parquet")
        n_rows = 8 * 10
    reference = pd.read_csv(committed / "metrics.csv")
    merged = part.merge(reference, on=["image_set", "image_id", "method"], suffixes=("", "_committed"))
    assert len(merged) == len(part) == n_rows
    for column in ("a_mif", "a_lif", "a_box", "compactness", "delta_a_lif_mif", "delta_a_box", "share_in_own_mask"):
        assert merged[column].to_numpy() == pytest.approx(merged[f"{column}_committed"].to_numpy(), rel=1e-3, abs=1e-3)


def test_imagenet_sets_end_to_end_on_a_fake_validation_folder(tmp_path, checkpoint):
    """X_multi- and X_val-style manifests over a tiny flat validation folder (one file corrupt)."""
    from PIL import Image

    from lidc_cdam.data.imagenet import write_manifest

    val = tmp_path / "val"
    val.mkdir()
    names = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 6)]
    rng = torch.Generator().manual_seed(0)
    for name in names[:4]:
        Image.fromarray((torch.rand(48, 60, 3, generator=rng) * 255).byte().numpy()).save(val / name)
    (val / names[4]).write_bytes(b"\xff\xd8 truncated jpeg")
    multi = pd.DataFrame({"image": names, "val_index": range(1, 6), "c1": [1, 2, 3, 4, 5], "c2": [6, 7, 8, 9, 0]})
    write_manifest(multi, tmp_path / "xmulti.csv")
    write_manifest(multi[["image", "val_index"]].iloc[:3], tmp_path / "xval.csv")
    config = load_config(write_config(tmp_path, checkpoint, randomization={"images": 0}, image_sets=[
        {"name": "xmulti", "source": "imagenet", "manifest": str(tmp_path / "xmulti.csv"), "root": str(val),
         "targets": "labels", "paper_tables": {"fidelity": "Table 1"}},
        {"name": "xval", "source": "imagenet", "manifest": str(tmp_path / "xval.csv"), "root": str(val),
         "targets": "predicted", "paper_tables": {"fidelity": "Table S1"}}]))
    summary = run_benchmark(config, tmp_path / "out", progress=False)
    metrics = pd.read_csv(tmp_path / "out" / "metrics.csv")
    xmulti = metrics[metrics["image_set"] == "xmulti"]
    assert sorted(xmulti["image_id"].unique()) == names[:4]
    first = xmulti[xmulti["image_id"] == names[0]].iloc[0]
    assert (first["c1"], first["c2"]) == (1, 6)  # the manifest's pair and order: c1 recorded
    assert (metrics.loc[metrics["image_set"] == "xval", "c2"] == -1).all()
    assert summary["image_sets"]["xmulti"]["skipped"] == 1 and summary["image_sets"]["xval"]["images"] == 3
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv")
    assert skipped["reason"].str.contains(names[4]).all()
    text = (tmp_path / "out" / "tables.md").read_text()
    assert "(paper Table 1)" in text and "(paper Table S1)" in text
