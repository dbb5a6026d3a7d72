"""The LIDC folds as the trainer sees them: :func:`lidc_cdam.data.lidc.datasets.lidc_datasets` for a
training config (test = the fold, validation = the next fold, training = the other three)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lidc_cdam.train.config import TrainConfig, TrainConfigError
from lidc_cdam.train.engine import FoldData

MALIGNANCY_OUTPUTS = ["malignant"]


def output_names(task: str) -> list[str]:
    from lidc_cdam.data.lidc.nodules import BIOMARKERS

    return list(MALIGNANCY_OUTPUTS) if task == "malignancy" else list(BIOMARKERS)


def check_data_root(config: TrainConfig) -> Path:
    if not config.data.root:
        raise TrainConfigError(f"{config.source_file or '<config>'}: data.root is not set; pass --data DIR")
    root = Path(config.data.root)
    if not (root / "nodules.csv").is_file():
        raise TrainConfigError(
            f"{config.source_file or '<config>'}: data.root {root} has no nodules.csv; make one with "
            "`lidc-cdam preprocess --lidc-root DIR --out DIR` or `lidc-cdam phantoms --out DIR`")
    return root


def lidc_fold_data(config: TrainConfig, fold: int) -> FoldData:
    from lidc_cdam.data.lidc.datasets import lidc_datasets

    root = check_data_root(config)
    parts = lidc_datasets(root, fold=fold, view=config.data.view,
                          task="classification" if config.task == "malignancy" else "regression",
                          folds=config.data.folds, seed=config.seed,
                          rotate_prob=0.75 if config.data.augment else 0.0, size=config.data.image_size)
    stats = parts["stats"].as_dict()
    input_stats = {"mean": stats["mean"], "std": stats["std"], "view": config.data.view,
                   "image_size": config.data.image_size, "hu_clip": [-1000, 400],
                   "note": "central slice of the 32^3 crop, 3 channels, resized, (HU - mean) / std"}
    target_stats = ({"names": stats["biomarkers"], "mean": stats["biomarker_mean"], "std": stats["biomarker_std"]}
                    if config.task == "biomarkers" else None)
    info = {"root": str(root), "fold": fold, "sizes": {k: len(parts["tables"][k]) for k in ("train", "val", "test")}}
    if (root / "PHANTOM.txt").exists() or "phantom" in str(parts["tables"]["train"].get("source", "")).lower():
        info["phantom"] = True
    return FoldData(parts["train"], parts["val"], output_names(config.task), fold, test=parts["test"],
                    input_stats=input_stats, target_stats=target_stats, info=info)


def nodule_table(config: TrainConfig) -> pd.DataFrame:
    return pd.read_csv(check_data_root(config) / "nodules.csv")


def fold_split(config: TrainConfig, fold: int) -> dict[str, list[str]]:
    from lidc_cdam.data.lidc.folds import read_folds, split

    folds = read_folds(*(() if config.data.folds is None else (config.data.folds,)))
    present = set(nodule_table(config)["nodule_id"])
    parts = split(folds[folds["nodule_id"].isin(present)], fold)
    return parts
