"""Phantom training variants: each nodule re-rendered with every rating drawn on its own, for training only."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lidc_cdam.data.lidc.crops import read_crop
from lidc_cdam.data.lidc.datasets import lidc_datasets
from lidc_cdam.data.lidc.errors import LidcError
from lidc_cdam.data.lidc.phantom_render import RATED, _rating_pool, variant_ratings
from lidc_cdam.data.lidc.phantoms import build_phantoms, what_if_phantom

K = 2


@functools.cache
def variant_dir() -> Path:
    out = Path(tempfile.mkdtemp(prefix="lidc-variants-"))
    build_phantoms(out, n_scans=2, variants=K, progress=False)  # LIDC-IDRI-0001 and -0003: 4 nodules
    return out


def test_variant_ratings_are_drawn_per_rating_from_the_values_nodules_take():
    pool = _rating_pool()
    drawn = [variant_ratings(f"LIDC-IDRI-{i:04d}_s0001_n01", k) for i in range(200) for k in (1, 2)]
    assert variant_ratings("LIDC-IDRI-0000_s0001_n01", 1) == drawn[0]  # seeded: the same every time
    assert drawn[0] != drawn[1]
    frame = pd.DataFrame(drawn)
    for name in RATED:
        assert set(frame[name]) <= set(pool[name])
        assert frame[name].nunique() > len(pool[name]) // 2  # drawn over the whole range, not the mode
    # the rare ratings are as common as the frequent ones: most variants are calcified (rating < 6)
    assert (frame["calcification"] < 6).mean() > 0.8
    # drawn on their own: the real ratings' correlations (sphericity with spiculation) are gone
    assert abs(np.corrcoef(frame["sphericity"], frame["spiculation"])[0, 1]) < 0.15


def test_variants_are_written_with_their_ratings_and_rendered_as_the_what_if_of_those_ratings():
    out = variant_dir()
    nodules = pd.read_csv(out / "nodules.csv")
    variants = pd.read_csv(out / "variants.csv")
    assert len(variants) == K * len(nodules) == json.loads((out / "summary.json").read_text())["variants"]
    assert set(variants["parent_id"]) == set(nodules["nodule_id"])
    row = variants.iloc[0]
    parent = nodules.set_index("nodule_id").loc[row["parent_id"]]
    assert row["label"] == parent["label"] and row["diameter_mm"] == pytest.approx(parent["diameter_mm"])
    ratings = variant_ratings(row["parent_id"], int(row["variant"]))
    assert {k: row[k] for k in RATED} == pytest.approx(ratings, abs=1e-5)
    crop = read_crop(out / row["crop_path"])
    assert f"training variant {int(row['variant'])}" in crop["note"]
    # the same contour and background as the parent, the causes of the drawn ratings: what_if_phantom of them
    same = what_if_phantom(row["parent_id"], ratings)
    np.testing.assert_array_equal(crop["image"], same["image"])
    np.testing.assert_array_equal(crop["cause_calcification"], same["cause_calcification"])
    assert bool(crop["cause_calcification"].any()) == (ratings["calcification"] < 6 - 1e-6)


def test_a_rerun_resumes_and_other_variant_counts_redo_the_scans():
    out = variant_dir()
    scans = sorted((out / "scans").glob("*.json"))
    before = {p: p.stat().st_mtime_ns for p in scans}
    build_phantoms(out, n_scans=2, variants=K, progress=False)
    assert {p: p.stat().st_mtime_ns for p in scans} == before
    other = Path(tempfile.mkdtemp(prefix="lidc-variants-"))
    build_phantoms(other, n_scans=1, progress=False)
    assert not (other / "variants.csv").exists()
    build_phantoms(other, n_scans=1, variants=1, progress=False)  # settings differ: the scan is redone
    assert len(pd.read_csv(other / "variants.csv")) == len(pd.read_csv(other / "nodules.csv"))


def test_training_sees_the_variants_of_its_own_nodules_and_validation_and_test_none():
    out = variant_dir()
    ids = pd.read_csv(out / "nodules.csv")["nodule_id"].tolist()
    folds = pd.DataFrame({"nodule_id": ids, "fold": [0, 1, 2, 2]})
    parts = lidc_datasets(out, fold=0, task="regression", folds=folds, variants=True, size=64)
    train_ids = set(parts["tables"]["train"]["nodule_id"])
    assert set(parts["tables"]["train_variants"]["parent_id"]) == train_ids
    assert len(parts["train"]) == (K + 1) * len(train_ids)
    assert len(parts["val"]) == len(parts["test"]) == 1
    # a variant's targets are its own (drawn) ratings, standardised with the training part's statistics
    stats = parts["stats"]
    v = parts["tables"]["train_variants"].iloc[0]
    from lidc_cdam.data.lidc.nodules import BIOMARKERS

    expected = (v[list(BIOMARKERS)].to_numpy(float) - stats.biomarker_mean) / stats.biomarker_std
    np.testing.assert_allclose(parts["train"][len(train_ids)]["biomarkers"].numpy(), expected, rtol=1e-5, atol=1e-6)
    without = lidc_datasets(out, fold=0, task="regression", folds=folds, size=64)
    assert len(without["train"]) == len(train_ids) and "train_variants" not in without["tables"]


def test_asking_for_variants_without_them_names_the_folder_and_the_command(tmp_path):
    out = variant_dir()
    import shutil

    shutil.copy(out / "nodules.csv", tmp_path / "nodules.csv")
    shutil.copytree(out / "crops", tmp_path / "crops")
    ids = pd.read_csv(out / "nodules.csv")["nodule_id"].tolist()
    folds = pd.DataFrame({"nodule_id": ids, "fold": [0, 1, 2, 2]})
    with pytest.raises(LidcError, match=r"no variants.csv.*--variants"):
        lidc_datasets(tmp_path, fold=0, task="regression", folds=folds, variants=True, size=64)
    bad = pd.read_csv(out / "variants.csv")
    bad.loc[0, "crop_path"] = "../../etc/passwd"
    bad.to_csv(tmp_path / "variants.csv", index=False)
    with pytest.raises(LidcError, match=r"variants.csv: crop_path .* leaves the data folder"):
        lidc_datasets(tmp_path, fold=0, task="regression", folds=folds, variants=True, size=64)


def test_a_biomarker_model_is_scored_on_the_test_nodules_variants_too(tmp_path):
    from lidc_cdam.pipelines.cli import main

    from lidc_cdam.models.loading import load_model

    out = variant_dir()
    ids = pd.read_csv(out / "nodules.csv")["nodule_id"].tolist()
    folds = tmp_path / "folds.csv"
    pd.DataFrame({"nodule_id": ids, "fold": [0, 1, 2, 2]}).to_csv(folds, index=False)
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="validation part"):
        assert main(["train", "--config", "tiny-phantom-biomarkers", "--data", str(out), "--folds", "0",
                     "--set", "epochs=1", "--set", "data.variants=true", "--set", f"data.folds={folds}",
                     "--out", str(run), "--no-progress"]) == 0
    result = json.loads((run / "fold0" / "result.json").read_text())
    assert result["train_size"] == (K + 1) * 2
    scored = {k for k in result["test_metrics"] if k.startswith("variants_r2_")}
    assert scored == {f"variants_r2_{b}" for b in ("subtlety", "calcification", "sphericity", "margin",
                                                   "lobulation", "spiculation", "texture", "diameter_mm")}
    assert "on the test nodules' variants" in (run / "summary.md").read_text()
    meta = load_model(run / "fold0" / "best.pt").meta
    assert meta["data"]["train_variants"] == K * 2 and len(meta["data"]["variants_sha256"]) == 64
