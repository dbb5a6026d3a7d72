"""`lidc-cdam demo`, the README's first command, on the cached demo model."""

import json

import numpy as np
import pytest
from lidc_cdam.pipelines.cli import main


@pytest.mark.slow
def test_demo_writes_figures_and_each_map_favours_its_own_digit(demo_model, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--images", "8"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["images"]) == 8
    figures = sorted((out / "figures").glob("*.png"))
    assert len(figures) == 8
    # on average, positive evidence sits on the explained digit, not on the other one
    for method in ("cdam", "smooth-cdam", "integrated-cdam"):
        own = np.mean([r["positive_share_on_own_digit"][method] for r in summary["images"]])
        other = np.mean([r["positive_share_on_other_digit"][method] for r in summary["images"]])
        assert own > 0.6 and other < 0.3, (method, own, other)
        assert summary["share_of_maps_more_positive_on_own_digit"][method] >= 0.75
    maps = np.load(out / "maps.npz")
    assert maps["cdam"].shape == (8, 2, 8, 8)
    assert "figures in" in capsys.readouterr().out


def test_demo_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        main(["demo", "--images", "0", "--out", str(tmp_path)])
