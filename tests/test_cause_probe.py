"""benchmarks/cause_probe.py (issue 22): trains a CNN or the tiny ViT on one fold of a phantom folder and reports
the held-out R^2 per target, on the image or on the rendered silhouette."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_lidc_phantoms import phantom_dir

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cause_probe.py"


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("cause_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = phantom_dir()
    ids = sorted(pd.read_csv(out / "nodules.csv")["nodule_id"])
    folds = tmp_path_factory.mktemp("folds") / "folds.csv"
    pd.DataFrame({"nodule_id": ids, "fold": [0, 0, 1, 2, 3, 4][:len(ids)]}).to_csv(folds, index=False)
    return out, folds


@pytest.mark.parametrize(("model", "target", "what"), [("cnn", "sphericity", "image"), ("vit", "all", "body")])
def test_probe_reports_held_out_r_squared_per_target(probe, phantoms, model, target, what, capsys):
    out, folds = phantoms
    result = probe.main(["--data", str(out), "--folds", str(folds), "--model", model, "--target", target,
                         "--input", what, "--epochs", "2"])
    n = 8 if target == "all" else 1
    assert len(result["targets"]) == n and len(result["test"]) == n and np.isfinite(result["test"]).all()
    assert "held-out R^2" in capsys.readouterr().out


def test_silhouette_inputs_hold_two_values_and_the_body_drops_the_spikes(probe, phantoms):
    out, _ = phantoms
    table = pd.read_csv(out / "nodules.csv")
    spiculated = table.sort_values("spiculation").tail(1)
    stats = type("S", (), {"mean": -700.0, "std": 300.0})()
    mask = probe.slices(str(out), spiculated, [16], "mask", stats)
    body = probe.slices(str(out), spiculated, [16], "body", stats)
    image = probe.slices(str(out), spiculated, [16], "image", stats)
    assert mask.shape == body.shape == image.shape == (1, 1, 3, probe.SIZE, probe.SIZE)
    low, high = (-850.0 + 700.0) / 300.0, 700.0 / 300.0  # parenchyma and nodule, z-scored
    values = mask.numpy().ravel()
    assert values.min() == pytest.approx(low) and values.max() == pytest.approx(high)
    assert np.isclose(values, low).mean() + np.isclose(values, high).mean() > 0.75  # the rest: the resized edge
    assert (body > 0).sum() <= (mask > 0).sum()
    with pytest.raises(SystemExit):
        probe.main(["--data", str(out), "--target", "roundness"])
