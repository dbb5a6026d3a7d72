"""Five deterministic folds stratified by malignancy (classification and regression share them).

``sklearn.model_selection.StratifiedKFold(n_splits=5, shuffle=True, random_state=SEED)`` over the nodules
sorted by ``nodule_id``; a nodule's fold is the split in which it is in the test part.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lidc_cdam.io import atomic_write
from lidc_cdam.resources import manifest_path

N_FOLDS = 5
SEED = 20240  # fixed: the committed data_manifest/lidc_folds.csv was made with it
MANIFEST = "lidc_folds.csv"  # shipped in lidc_cdam.data_manifest


def make_folds(nodules: pd.DataFrame, n_folds: int = N_FOLDS, seed: int = SEED) -> pd.DataFrame:
    """``nodule_id, label, fold`` for the labelled (0/1) nodules, sorted by ``nodule_id``."""
    from sklearn.model_selection import StratifiedKFold

    table = nodules.loc[nodules["label"].isin([0, 1]), ["nodule_id", "label"]]
    table = table.sort_values("nodule_id", kind="stable").reset_index(drop=True)
    fold = np.full(len(table), -1, dtype=int)
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, test) in enumerate(splitter.split(np.zeros(len(table)), table["label"].to_numpy())):
        fold[test] = k
    table["label"] = table["label"].astype(int)
    table["fold"] = fold
    return table


def write_folds(folds: pd.DataFrame, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: folds.to_csv(tmp, index=False, lineterminator="\n"))


def read_folds(path: str | Path | None = None) -> pd.DataFrame:
    """A folds table (default: the committed one)."""
    if path is None:
        path = manifest_path(MANIFEST)
    return pd.read_csv(path)


def split(folds: pd.DataFrame, test_fold: int, val_fold: int | None = None) -> dict[str, list[str]]:
    """Nodule ids of the train / (val) / test parts for one fold index (val: by default the next fold)."""
    if not 0 <= test_fold < folds["fold"].max() + 1:
        raise ValueError(f"fold must be in 0..{folds['fold'].max()}, got {test_fold}")
    n = int(folds["fold"].max()) + 1
    val_fold = (test_fold + 1) % n if val_fold is None else val_fold
    parts = {
        "test": folds.loc[folds["fold"] == test_fold, "nodule_id"],
        "val": folds.loc[folds["fold"] == val_fold, "nodule_id"] if val_fold >= 0 else folds.iloc[:0]["nodule_id"],
        "train": folds.loc[~folds["fold"].isin([test_fold, val_fold]), "nodule_id"],
    }
    return {k: sorted(v.tolist()) for k, v in parts.items()}
