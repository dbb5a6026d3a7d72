"""benchmarks/device_check.sh: its CPU smoke mode runs every part at a tiny size and writes the JSON
files (per part and the summary) that the GPU run writes. No test needs a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.sh"
PARTS = ("cdam_fp32", "cdam_bf16", "evaluate_fp32", "evaluate_bf16", "runner", "train")


def run_script(*args: str, timeout: float = 840, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def test_script_parses_and_documents_its_options():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    result = run_script("--help", timeout=30)
    assert result.returncode == 0
    for option in ("--smoke", "--results", "--archive", "--python", "T_EVAL"):
        assert option in result.stdout
    assert run_script("--no-such-option", timeout=30).returncode == 2


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smoke_run_writes_every_part(tmp_path):
    """Also without scikit-image (not a dependency; a GPU image may have torch and timm alone): an
    ``import skimage`` that fails stands in for it being uninstalled (issue 23)."""
    results = tmp_path / "gpu"
    archive = tmp_path / "gpu.tgz"
    blocker = tmp_path / "no_skimage" / "skimage"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('scikit-image is not installed (blocked by the test)')\n")
    path = os.pathsep.join(p for p in (str(blocker.parent), os.environ.get("PYTHONPATH", "")) if p)
    run = run_script("--smoke", "--results", str(results), "--archive", str(archive), PYTHONPATH=path)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert archive.stat().st_size > 0
    for part in PARTS:
        assert (results / f"{part}.txt").read_text().strip()
        data = json.loads((results / f"{part}.json").read_text())
        assert {"torch", "cuda", "gpu", "device"} <= set(data["environment"])
        assert data["rows"]
    summary = json.loads((results / "summary.json").read_text())
    assert summary["smoke"] is True and summary["all_ok"] is True and summary["device"] == "cpu"
    assert {"torch", "cuda", "gpu", "nvidia_smi"} <= set(summary["environment"])
    assert list(summary["parts"]) == list(PARTS)
    for part in summary["parts"].values():
        assert {"status", "exit_code", "seconds", "limit_s", "line", "result"} <= set(part)
        assert part["status"] == "ok"
    # one summary line per part, in the printed output and in summary.txt
    text = (results / "summary.txt").read_text().splitlines()
    assert len(text) == 1 + len(PARTS)
    for part in PARTS:
        assert any(line.startswith(part) for line in run.stdout.splitlines())

    cdam = json.loads((results / "cdam_bf16.json").read_text())
    assert cdam["amp"] == "bf16" and cdam["check_rel_error"]
    assert {"model", "method", "targets", "forward_s", "ours_s", "ours_ratio", "naive_ratio"} <= set(cdam["rows"][0])
    evaluate = json.loads((results / "evaluate_fp32.json").read_text())["summary"]
    assert evaluate["source"] == "digits" and evaluate["metric_values"] == "valid"  # no scikit-image
    assert json.loads((results / "evaluate_bf16.json").read_text())["summary"]["metric_values"].startswith("timing")
    runner = json.loads((results / "runner.json").read_text())["summary"]
    assert runner["images"] == 2 and runner["images_per_minute"] > 0 and len(runner["methods"]) == 10
    for key in ("images_per_minute", "ratio_to_lower_bound", "lower_bound_s_per_image", "forwards_per_image",
                "metrics_s_per_image", "explain_s_per_image", "box_sizes", "n_boxes", "methods"):
        assert key in evaluate
    assert len(evaluate["methods"]) == 10  # the paper-imagenet preset's ten methods
    assert evaluate["forwards_per_image"] == len(evaluate["box_sizes"]) * evaluate["n_boxes"] + 1 + 10 * 2 * 20 * 2
    train = json.loads((results / "train.json").read_text())["rows"]
    assert [r["amp"] for r in train] == ["bf16", "none"] and train[0]["step"] == "lidc_cdam.train.step.TrainStep"
    assert all(r["steps_per_s"] > 0 and r["loss_finite"] for r in train)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_gpu_run_without_a_gpu_stops_with_advice(tmp_path):
    run = run_script("--results", str(tmp_path), timeout=300)
    assert run.returncode == 2
    assert "--smoke" in run.stdout
    assert not (tmp_path / "summary.json").exists()
