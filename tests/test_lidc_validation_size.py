"""A fold whose validation part is tiny is reported when its data are built (no training needed)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from train_helpers import TINY_BACKBONE

from lidc_cdam.data.lidc.nodules import BIOMARKERS
from lidc_cdam.train.config import config_from_dict
from lidc_cdam.train.lidc_data import MIN_VALIDATION, check_validation_size, lidc_fold_data


def nodule_folder(root: Path, labels_per_fold: dict[int, list[int]]) -> Path:
    """A preprocess-style folder (nodules.csv, tiny crops) and its folds table ``folds.csv``."""
    (root / "crops").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, folds = [], []
    for fold, labels in labels_per_fold.items():
        for i, label in enumerate(labels):
            nid = f"N{fold}-{i:03d}"
            np.savez(root / "crops" / f"{nid}.npz", image=rng.integers(-1000, 400, (32, 32, 32)).astype(np.int16),
                     mask=np.zeros((32, 32, 32), np.uint8))
            rows.append({"nodule_id": nid, "label": label, "crop_path": f"crops/{nid}.npz", "source": "test",
                         **{b: float(rng.uniform(1, 5)) for b in BIOMARKERS}})
            folds.append({"nodule_id": nid, "fold": fold})
    pd.DataFrame(rows).to_csv(root / "nodules.csv", index=False)
    pd.DataFrame(folds).to_csv(root / "folds.csv", index=False)
    return root


def config(root: Path, task: str):
    return config_from_dict({"name": "tiny", "task": task, "backbone": TINY_BACKBONE,
                             "data": {"root": str(root), "folds": str(root / "folds.csv"), "image_size": 32}})


def test_tiny_validation_fold_warns_with_the_fold_and_the_counts(tmp_path):
    labels = {f: [0] * 12 + [1] * 12 for f in range(5)}
    labels[1] = [0] * 3 + [1] * 12  # fold 0 validates on fold 1: 3 benign
    root = nodule_folder(tmp_path, labels)
    with pytest.warns(UserWarning, match=r"fold 0: the validation part \(fold 1 of the folds table\) is tiny: "
                                         r"3 benign, 12 malignant nodules \(fewer than 10 per class\)"):
        data = lidc_fold_data(config(root, "malignancy"), 0)
    assert data.info["sizes"]["val"] == 15
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"fold \d+: the validation part")
        lidc_fold_data(config(root, "malignancy"), 2)  # validates on fold 3: 12 + 12


@pytest.mark.parametrize(("n", "warns"), [(MIN_VALIDATION - 1, True), (MIN_VALIDATION, False)])
def test_regression_counts_the_whole_validation_part(n, warns):
    val = pd.DataFrame({"nodule_id": [f"N{i}" for i in range(n)], "label": [0] * n, "fold": [4] * n})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert check_validation_size(val, 3, "biomarkers") == {"total": n}
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if warns:
        assert len(messages) == 1
        assert messages[0].startswith(f"fold 3: the validation part (fold 4 of the folds table) is tiny: {n} nodules "
                                      "(fewer than 10 in all)")
    else:
        assert messages == []


def test_a_class_missing_from_validation_counts_as_zero():
    val = pd.DataFrame({"label": [1] * 20, "fold": [2] * 20})
    with pytest.warns(UserWarning, match="0 benign, 20 malignant"):
        assert check_validation_size(val, 1, "malignancy") == {"benign": 0, "malignant": 20}
