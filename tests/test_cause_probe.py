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


@pytest.mark.parametrize(("model", "target", "what", "more"), [
    ("cnn", "sphericity", "image", []),
    ("vit", "all", "body", []),
    ("vit", "sphericity", "image", ["--pool", "avgmax", "--vit-init", "mimetic", "--depth", "1"]),
])
def test_probe_reports_held_out_r_squared_per_target(probe, phantoms, model, target, what, more, capsys):
    out, folds = phantoms
    result = probe.main(["--data", str(out), "--folds", str(folds), "--model", model, "--target", target,
                         "--input", what, "--epochs", "2", *more])
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


def test_the_probes_vit_is_built_as_asked(probe):
    plain, mimetic = probe.vit(1), probe.vit(1, depth=3, pool="avgmax", init="mimetic")
    assert len(plain.blocks) == 2 and plain.global_pool == "avg"
    assert len(mimetic.blocks) == 3 and mimetic.global_pool == "avgmax"
    for model, diagonal in ((plain, 0.0), (mimetic, -0.4)):  # W_o W_v: about -0.4 I after mimetic init only
        w = model.blocks[0].attn.qkv.weight.detach()
        vo = model.blocks[0].attn.proj.weight.detach() @ w[128:]
        assert float(vo.diagonal().mean()) == pytest.approx(diagonal, abs=0.08)


ORACLE = Path(__file__).resolve().parents[1] / "benchmarks" / "cause_oracle.py"


def test_oracle_reads_the_axis_ratio_of_body_mask_and_image(phantoms, capsys):
    spec = importlib.util.spec_from_file_location("cause_oracle", ORACLE)
    oracle = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(oracle)
    disc = np.zeros((32, 32), bool)
    disc[10:22, 13:19] = True  # 12 x 6 pixels
    assert oracle.axis_ratio(disc) == pytest.approx(2.0, rel=0.05)
    assert np.isnan(oracle.axis_ratio(disc[:1, :2]))
    box = np.zeros((32, 32, 32), bool)
    box[4:28, 10:22, 13:19] = True  # 24 x 12 x 6 voxels: second moments in the ratio of the sides squared
    assert oracle.axis_ratios_3d(box) == pytest.approx((4.0, 2.0), rel=0.05)
    out, _ = phantoms
    frame = oracle.readings(str(out))
    assert len(frame) == len(pd.read_csv(out / "nodules.csv"))
    assert (frame[["body", "mask"]] >= 1).all().all()
    result = oracle.main([str(out)])[str(out)]
    assert set(result) == {f"{r}{s}" for r in (*oracle.READINGS, "body_3d") for s in ("", "_8mm_up")}
    assert result["body_3d"] >= result["body"] - 1e-9  # a least-squares fit that includes the body's reading
    assert 0 <= result["body"] <= 1 and "R^2 of the sphericity rating" in capsys.readouterr().out
