"""Trust statistics added to a checkpoint trained before they existed (:func:`add_trust_to_checkpoint`).

The statistics themselves are :mod:`lidc_cdam.models.trust`'s (the model layer, no data); this module reads an
LIDC folder's training crops (:mod:`lidc_cdam.data.lidc`) and writes the checkpoint, so it sits in ``train``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from lidc_cdam.data.lidc.crops import read_crop
from lidc_cdam.data.lidc.datasets import checkpoint_dataset
from lidc_cdam.data.lidc.folds import read_folds, split
from lidc_cdam.io import save_torch
from lidc_cdam.models import domain_trust
from lidc_cdam.models.loading import model_from_payload, read_checkpoint
from lidc_cdam.models.trust import dataset_latents, fit_trust
from lidc_cdam.resources import weights_path


def training_ids(data_root: str | Path, fold: int, folds: str | Path | None = None) -> list[str]:
    """Nodule ids of the training part of ``fold`` (not test, not validation = the next fold) among the crops
    of ``data_root``, with the folds table ``folds`` (default: the committed one), as ``lidc-cdam train``."""
    table = read_folds(*(() if folds is None else (folds,)))
    present = set(pd.read_csv(Path(data_root) / "nodules.csv")["nodule_id"])
    return split(table[table["nodule_id"].isin(present)], int(fold))["train"]


def add_trust_to_checkpoint(checkpoint: str | os.PathLike, data_root: str | os.PathLike, fold: int,
                            out: str | os.PathLike | None = None, *, batch_size: int = 64,
                            folds: str | Path | None = None) -> dict[str, Any]:
    """Fit the trust statistics of a trained LIDC checkpoint on the training part of ``fold`` of ``data_root``
    and write the checkpoint to ``out`` (default: in place) with, as the training engine stores them,
    ``meta["trust"]``: the current version (:mod:`lidc_cdam.models.domain_trust`, from the training crops'
    files), and ``meta["trust_latent"]``: version 1 (:mod:`lidc_cdam.models.trust`: the latents of the crops built
    with the checkpoint's own ``meta["input_stats"]``, no augmentation), which the side-by-side evaluation
    (:mod:`lidc_cdam.evaluate.trust_shift`) reads. Returns the current-version statistics.

    ``folds``: the folds table (default: the one the checkpoint's training config names, else the committed
    one). The shipped weight files are never rewritten in place (pass ``out``).
    """
    checkpoint = Path(checkpoint)
    target = Path(out) if out is not None else checkpoint
    weights = weights_path("MANIFEST.json").resolve().parent
    if target.resolve().parent == weights:
        raise ValueError(f"{target}: a shipped weight file (its SHA-256 is recorded); write to another path (out=)")
    payload = read_checkpoint(checkpoint)
    model = model_from_payload(payload, str(checkpoint))
    meta = payload.get("meta") or {}
    input_stats = meta.get("input_stats")
    if not input_stats:
        raise ValueError(f"{checkpoint}: no meta['input_stats']: not an LIDC checkpoint of `lidc-cdam train`")
    if folds is None:
        folds = ((meta.get("train_config") or {}).get("data") or {}).get("folds")
    ids = training_ids(data_root, fold, folds)
    task = "classification" if model.task == "classification" else "regression"
    dataset = checkpoint_dataset(data_root, ids, input_stats, task=task, target_stats=meta.get("target_stats"))
    latent = fit_trust(dataset_latents(model, dataset, batch_size))
    table = pd.read_csv(Path(data_root) / "nodules.csv").set_index("nodule_id")
    crops = (read_crop(Path(data_root) / table.loc[i, "crop_path"])["image"] for i in ids)
    stats = domain_trust.fit_from_crops(model, crops, input_stats, batch_size=batch_size)
    where = {"root": str(data_root), "fold": int(fold), "part": "train"}
    stats["data"], latent["data"] = where, dict(where)
    payload["meta"] = {**meta, "trust": stats, "trust_latent": latent}
    save_torch(target, payload)
    return stats
