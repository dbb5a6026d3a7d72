"""pylidc shim, the nodule table from the annotation database, and the folds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lidc_helpers import pylidc

from lidc_cdam.data.lidc import folds as folds_mod
from lidc_cdam.data.lidc import nodules as nod
from lidc_cdam.resources import manifest_path

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_importing_lidc_cdam_does_not_import_pylidc():
    code = ("import sys, lidc_cdam, lidc_cdam.data.lidc, lidc_cdam.data.lidc.nodules, lidc_cdam.data.lidc.crops; "
            "assert 'pylidc' not in sys.modules, 'pylidc imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_shim_and_dicom_root_option_never_touch_user_config(tmp_path, monkeypatch):
    from lidc_cdam.data.lidc import pylidc_compat as compat

    monkeypatch.setenv("HOME", str(tmp_path))
    pl = compat.import_pylidc(tmp_path / "dicom")
    assert np.__dict__["int"] is int and np.__dict__["float"] is float  # numpy 2 has np.bool itself
    scan_module = sys.modules["pylidc.Scan"]
    assert scan_module._get_dicom_file_path_from_config_file() == str((tmp_path / "dicom").resolve())
    # no root given, no ~/.pylidcrc: a clear error, and no template written there
    compat.set_dicom_root(None)
    with pytest.raises(compat.LidcError, match="--lidc-root"):
        scan_module._get_dicom_file_path_from_config_file()
    assert not (tmp_path / ".pylidcrc").exists()
    # the user's file is read, never rewritten
    (tmp_path / ".pylidcrc").write_text("[dicom]\npath = /data/LIDC\n")
    assert scan_module._get_dicom_file_path_from_config_file() == "/data/LIDC"
    assert (tmp_path / ".pylidcrc").read_text() == "[dicom]\npath = /data/LIDC\n"
    assert pl.query(pl.Scan).count() == 1018 and pl.query(pl.Annotation).count() == 6859


def test_committed_table_counts_and_ranges():
    table = nod.read_nodule_table()
    assert nod.counts(table) == {"candidates": 862, "benign": 447, "malignant": 415}
    assert list(table.columns) == nod.COLUMNS
    assert table["nodule_id"].is_unique and table["nodule_id"].is_monotonic_increasing
    assert table["n_annotations"].between(3, 4).all()
    assert (table["malignancy_median"] != 3).all()
    assert ((table["malignancy_median"] > 3) == (table["label"] == 1)).all()
    assert table.groupby("patient_id")["scan_id"].nunique().max() == 1  # one scan per patient
    ranges = {"subtlety": (1, 5), "calcification": (1, 6), "sphericity": (1, 5), "margin": (1, 5),
              "lobulation": (1, 5), "spiculation": (1, 5), "texture": (1, 5), "internal_structure": (1, 4)}
    for col, (lo, hi) in ranges.items():
        assert table[col].between(lo, hi).all(), col
    assert table["diameter_mm"].between(3, 60).all()
    # biomarkers are the means of the raw ratings kept beside them
    for col in ("subtlety", "texture"):
        means = table[f"ratings_{col}"].map(lambda s: np.mean([float(v) for v in s.split(";")]))
        np.testing.assert_allclose(means, table[col], atol=1e-5)
    assert (table["bbox_i0"] <= table["centroid_i"]).all() and (table["centroid_i"] < table["bbox_i1"]).all()
    assert (table["consensus_voxels"] > 0).all()


def test_table_rebuild_for_some_patients_matches_committed_rows_and_is_deterministic(tmp_path):
    patients = ["LIDC-IDRI-0001", "LIDC-IDRI-0003", "LIDC-IDRI-0078", "LIDC-IDRI-0957"]
    pylidc()
    a = nod.build_nodule_table(patients=patients)
    b = nod.build_nodule_table(patients=patients)
    pd.testing.assert_frame_equal(a, b)
    nod.write_nodule_table(a, tmp_path / "t.csv")
    header, *rows = (tmp_path / "t.csv").read_text().splitlines()
    committed = manifest_path(nod.MANIFEST).read_text().splitlines()
    assert header == committed[0]
    assert rows == [line for line in committed[1:] if line.split(",")[1] in patients]
    assert len(rows) == 8


@pytest.mark.slow
def test_committed_table_equals_a_full_rebuild(tmp_path):
    """The whole database (about a minute on two cores)."""
    table = nod.build_nodule_table(workers=2)
    assert nod.counts(table) == {"candidates": 862, "benign": 447, "malignant": 415}
    nod.write_nodule_table(table, tmp_path / "lidc_nodules.csv")
    assert (tmp_path / "lidc_nodules.csv").read_bytes() == manifest_path(nod.MANIFEST).read_bytes()


def test_annotations_only_job_writes_the_table(tmp_path):
    from lidc_cdam.pipelines.cli import main

    assert main(["preprocess", "--annotations-only", "--out", str(tmp_path), "--scans", "LIDC-IDRI-0078",
                 "--workers", "1", "--no-progress"]) == 0
    out = nod.read_nodule_table(tmp_path / "nodules.csv")
    assert out["nodule_id"].tolist() == ["LIDC-IDRI-0078_s0001_n01", "LIDC-IDRI-0078_s0001_n02",
                                         "LIDC-IDRI-0078_s0001_n04"]


# ------------------------------------------------------------------------------------------------ folds


def test_committed_folds_are_stratified_disjoint_and_cover_all():
    table = nod.read_nodule_table()
    folds = folds_mod.read_folds()
    assert sorted(folds["nodule_id"]) == sorted(table["nodule_id"])  # cover all, each once
    assert folds["nodule_id"].is_unique
    assert sorted(folds["fold"].unique()) == [0, 1, 2, 3, 4]
    per = folds.groupby(["fold", "label"]).size().unstack()
    assert per.max().max() - per.min().min() <= per.to_numpy().max() - per.to_numpy().min()
    assert (per[0].max() - per[0].min()) <= 1 and (per[1].max() - per[1].min()) <= 1
    labels = table.set_index("nodule_id")["label"]
    assert (folds.set_index("nodule_id")["label"] == labels.loc[folds["nodule_id"]]).all()


def test_folds_are_deterministic_and_equal_the_committed_file(tmp_path):
    table = nod.read_nodule_table()
    a = folds_mod.make_folds(table)
    b = folds_mod.make_folds(table.sample(frac=1.0, random_state=3))  # row order does not matter
    pd.testing.assert_frame_equal(a, b)
    folds_mod.write_folds(a, tmp_path / "f.csv")
    assert (tmp_path / "f.csv").read_bytes() == manifest_path(folds_mod.MANIFEST).read_bytes()
    c = folds_mod.make_folds(table, seed=1)
    assert not (c["fold"].to_numpy() == a["fold"].to_numpy()).all()


def test_split_parts_are_disjoint():
    folds = folds_mod.read_folds()
    parts = folds_mod.split(folds, 2)
    ids = [set(v) for v in parts.values()]
    assert sum(map(len, ids)) == len(folds) and not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert manifest_path(folds_mod.MANIFEST).name == "lidc_folds.csv"
