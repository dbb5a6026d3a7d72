"""The LIDC folds as the trainer sees them: :func:`lidc_cdam.data.lidc.datasets.lidc_datasets` for a
training config (test = the fold, validation = the next fold, training = the other three).

A validation part with fewer than :data:`MIN_VALIDATION` nodules per class (malignancy) or in all (biomarkers)
is reported with a ``UserWarning``: the validation metrics that pick the best checkpoint and stop early are then
mostly noise (small subsets of the data, phantoms of a few scans).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd

from lidc_cdam.data.lidc.datasets import checkpoint_dataset, lidc_datasets
from lidc_cdam.data.lidc.folds import read_folds, split
from lidc_cdam.data.lidc.nodules import BIOMARKERS
from lidc_cdam.models.provenance import file_sha256
from lidc_cdam.train.config import TrainConfig, TrainConfigError
from lidc_cdam.train.engine import FoldData

MALIGNANCY_OUTPUTS = ["malignant"]
MALIGNANCY_CLASSES = {0: "benign", 1: "malignant"}
#: Fewer validation nodules than this, per class for malignancy or in all for biomarkers, gives a warning.
MIN_VALIDATION = 10


def output_names(task: str) -> list[str]:
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


def check_validation_size(val: pd.DataFrame, fold: int, task: str) -> dict[str, int]:
    """The validation part's nodule counts (per class for ``"malignancy"``, ``"total"`` for ``"biomarkers"``);
    warns (``UserWarning``) when a count is below :data:`MIN_VALIDATION`. ``val``: its rows (``label``, and
    ``fold``: which fold of the folds table it is)."""
    if task == "malignancy":
        labels = val["label"].astype(int).tolist()
        counts = {name: labels.count(c) for c, name in MALIGNANCY_CLASSES.items()}
        rule = f"fewer than {MIN_VALIDATION} per class"
    else:
        counts = {"total": len(val)}
        rule = f"fewer than {MIN_VALIDATION} in all"
    if min(counts.values()) < MIN_VALIDATION:
        source = sorted({int(f) for f in val["fold"]}) if "fold" in val.columns else []
        where = f" (fold {source[0]} of the folds table)" if len(source) == 1 else ""
        listed = ", ".join(f"{n} {name}" for name, n in counts.items()) if task == "malignancy" else f"{len(val)}"
        warnings.warn(
            f"fold {fold}: the validation part{where} is tiny: {listed} nodules ({rule}); the validation "
            "metrics that choose the best checkpoint and stop early will be noisy. Use more data (more scans) "
            "or expect unstable results.", UserWarning, stacklevel=2)
    return counts


def lidc_fold_data(config: TrainConfig, fold: int) -> FoldData:
    root = check_data_root(config)
    parts = lidc_datasets(root, fold=fold, view=config.data.view,
                          task="classification" if config.task == "malignancy" else "regression",
                          folds=config.data.folds, seed=config.seed,
                          rotate_prob=0.75 if config.data.augment else 0.0, size=config.data.image_size,
                          variants=config.data.variants, rotation=config.data.rotation)
    check_validation_size(parts["tables"]["val"], fold, config.task)
    stats = parts["stats"].as_dict()
    input_stats = {"mean": stats["mean"], "std": stats["std"], "view": config.data.view,
                   "image_size": config.data.image_size, "hu_clip": [-1000, 400],
                   "note": "central slice of the 32^3 crop, 3 channels, resized, (HU - mean) / std"}
    if config.data.view == "3d":
        input_stats["note"] = ("the whole 32^3 crop as [1, z, y, x] (resampled to image_size^3), (HU - mean) / std; "
                               "maps are [gz, gy, gx] token grids")
    target_stats = ({"names": stats["biomarkers"], "mean": stats["biomarker_mean"], "std": stats["biomarker_std"]}
                    if config.task == "biomarkers" else None)
    info = {"root": str(root), "fold": fold, "sizes": {k: len(parts["tables"][k]) for k in ("train", "val", "test")}}
    if "train_variants" in parts["tables"]:
        info["train_variants"] = len(parts["tables"]["train_variants"])
        info["variants_sha256"] = file_sha256(root / "variants.csv")
    if (root / "PHANTOM.txt").exists() or "phantom" in str(parts["tables"]["train"].get("source", "")).lower():
        info["phantom"] = True
    info["kind"] = "phantom" if info.get("phantom") else "lidc-idri"  # crops of `lidc-cdam preprocess` (LIDC-IDRI)
    info["nodule_table_sha256"] = file_sha256(root / "nodules.csv")
    train_table = parts["tables"]["train"]
    trust_crops = ([str(root / p) for p in train_table["crop_path"]] if "crop_path" in train_table.columns
                   else None)  # the training crops, for the trust flag (lidc_cdam.models.domain_trust)
    trust = checkpoint_dataset(root, parts["tables"]["train"]["nodule_id"].tolist(), input_stats,
                               task="classification" if config.task == "malignancy" else "regression",
                               target_stats=target_stats)  # the training part without augmentation
    return FoldData(parts["train"], parts["val"], output_names(config.task), fold, test=parts["test"],
                    test_variants=parts.get("test_variants") if config.task == "biomarkers" else None,
                    input_stats=input_stats, target_stats=target_stats, info=info, trust=trust,
                    trust_crops=trust_crops)


def nodule_table(config: TrainConfig) -> pd.DataFrame:
    return pd.read_csv(check_data_root(config) / "nodules.csv")


def fold_split(config: TrainConfig, fold: int) -> dict[str, list[str]]:
    folds = read_folds(*(() if config.data.folds is None else (config.data.folds,)))
    present = set(nodule_table(config)["nodule_id"])
    parts = split(folds[folds["nodule_id"].isin(present)], fold)
    return parts
