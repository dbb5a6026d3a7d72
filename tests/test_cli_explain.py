"""`lidc-cdam explain` end to end on real photographs shipped by scikit-learn."""

import json

import numpy as np
import pytest
import torch
from helpers import TINY, tiny_vit
from lidc_cdam.pipelines.cli import main
from PIL import Image
from sklearn.datasets import load_sample_image

from lidc_cdam import METHODS, explain
from lidc_cdam.data.images import load_image


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("china.jpg", "flower.jpg"):
        Image.fromarray(load_sample_image(name)).save(folder / name.replace(".jpg", ".png"))
    (folder / "broken.png").write_bytes(b"not an image at all")
    return folder


@pytest.fixture
def checkpoint(tmp_path):
    model = tiny_vit(torch.float32)
    model.output_names = [f"c{i}" for i in range(7)]
    model.build = {"timm_name": None, "timm_kwargs": dict(TINY)}
    model.meta = {"normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    path = tmp_path / "tiny.pt"
    model.save(path)
    return path, model


def test_explain_cli_writes_maps_summary_and_figures(tmp_path, photos, checkpoint, capsys):
    path, model = checkpoint
    out = tmp_path / "out"
    code = main(["explain", str(photos), "--checkpoint", str(path), "--target", "2", "c5",
                 "--method", "cdam", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [s["file"].rsplit("/", 1)[-1] for s in summary["skipped"]] == ["broken.png"]
    assert "not a readable image" in summary["skipped"][0]["reason"]
    saved = np.load(out / "maps.npz")
    assert saved["maps_cdam"].shape == (2, 2, 4, 4) and saved["maps_attention"].shape == (2, 2, 4, 4)
    assert saved["target_names"].tolist() == [["c2", "c5"], ["c2", "c5"]]
    # the saved maps are what the API gives for the same preprocessed images
    files = [photos / "china.png", photos / "flower.png"]
    x = torch.stack([load_image(f, (32, 32), [0.5] * 3, [0.25] * 3) for f in files])
    np.testing.assert_allclose(saved["maps_cdam"], explain(model, x, [2, 5]).maps.numpy(), rtol=1e-5, atol=1e-7)
    figures = sorted((out / "figures").glob("*.png"))
    assert len(figures) == 2 and all(f.stat().st_size > 5000 for f in figures)
    with Image.open(figures[0]) as fig:
        rgb = np.asarray(fig.convert("RGB")).reshape(-1, 3).astype(int)
    orange = (rgb[:, 0] > 200) & (rgb[:, 1] > 90) & (rgb[:, 1] < 190) & (rgb[:, 2] < 90)
    blue = (rgb[:, 2] > 150) & (rgb[:, 0] < 90)
    assert orange.sum() > 50 and blue.sum() > 50, "signed maps show orange (positive) and blue (negative)"


def test_explain_cli_concept_and_smooth_options(tmp_path, photos, checkpoint):
    path, _ = checkpoint
    concept_dir = tmp_path / "concept"
    concept_dir.mkdir()
    Image.fromarray(load_sample_image("flower.jpg")).save(concept_dir / "a.png")
    out = tmp_path / "out"
    code = main(["explain", str(photos / "china.png"), "--checkpoint", str(path), "--concept-images",
                 str(concept_dir), "--concept-name", "flower", "--method", "smooth-cdam", "--n", "4",
                 "--seed", "1", "--no-figures", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"][0]["targets"] == ["flower"]
    assert summary["methods"]["smooth-cdam"]["options"]["n"] == 4
    assert summary["methods"]["smooth-cdam"]["options"]["seed"] == 1
    assert not (out / "figures").exists()


def test_explain_cli_clear_errors(tmp_path, photos, checkpoint, capsys):
    path, _ = checkpoint
    assert main(["explain", str(photos), "--checkpoint", str(path), "--target", "9", "--out", str(tmp_path)]) == 2
    assert "out of range" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    assert main(["explain", str(photos), "--checkpoint", str(bad), "--out", str(tmp_path)]) == 2
    assert "bad.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="do not apply"):
        main(["explain", str(photos), "--checkpoint", str(path), "--n", "5", "--out", str(tmp_path)])


def test_explain_cli_grid_of_all_methods(tmp_path, photos, checkpoint):
    """Figure 3 layout: methods as columns, targets as rows; pixel and token maps side by side."""
    path, _ = checkpoint
    out = tmp_path / "out"
    code = main(["explain", str(photos / "flower.png"), "--checkpoint", str(path), "--target", "1", "3",
                 "--method", "all", "--n", "3", "--seed", "0", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == set(METHODS)
    assert summary["methods"]["input-x-grad"]["kind"] == "pixels"
    assert summary["methods"]["smoothgrad"]["shape"] == [1, 2, 32, 32]
    with Image.open(out / "figures" / "0000_flower.png") as fig:
        width, height = fig.size
    assert width > 2 * height, "more method columns than target rows"
