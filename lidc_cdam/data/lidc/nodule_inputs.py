"""A checkpoint's model inputs for nodules of a preprocess / phantoms folder, without MONAI.

The central slice (index 16) of each 32^3 crop along the checkpoint's view, built exactly as training
built it (:func:`lidc_cdam.data.lidc.model_input.model_inputs`: HU clipped, 3 channels, bilinear resize,
``(HU - mean) / std`` with ``meta["input_stats"]``), and the same slice of the consensus mask on the
crop's 1 mm grid, and of each target's cause region where the crop has one (phantoms: ``cause_<target>``,
:mod:`lidc_cdam.data.lidc.phantom_causes`; CT crops have none). Crop paths come from the folder's
``nodules.csv`` and must stay inside the folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lidc_cdam.data.lidc.errors import LidcError
from lidc_cdam.data.lidc.folds import read_folds
from lidc_cdam.data.lidc.model_input import CENTRE, VIEWS, model_inputs, slice_plane

CAUSE_PREFIX = "cause_"


@dataclass(frozen=True)
class NodulePlanes:
    """HU and consensus-mask planes ``[n, 32, 32]`` (1 mm grid) of nodules, in the order of ``nodule_ids``;
    ``causes``: target -> its cause-region planes ``[n, 32, 32]`` (bool), for the targets whose
    ``cause_<target>`` every crop carries (none for CT crops)."""

    nodule_ids: list[str]
    hu: np.ndarray  # float32
    mask: np.ndarray  # bool
    view: str
    causes: dict[str, np.ndarray] = field(default_factory=dict)


def read_data_table(data_root: str | Path, folds: str | Path | pd.DataFrame | None = None) -> pd.DataFrame:
    """The folder's ``nodules.csv`` joined with a folds table (default: the committed one); only nodules
    in both. Raises :class:`LidcError` naming the file when it is missing or a crop path leaves the folder."""
    root = Path(data_root)
    table_path = root / "nodules.csv"
    if not table_path.is_file():
        raise LidcError(f"{table_path}: no nodule table (give the output folder of `lidc-cdam preprocess` "
                        "or `lidc-cdam phantoms`)")
    nodules = pd.read_csv(table_path)
    missing = {"nodule_id", "crop_path"} - set(nodules.columns)
    if missing:
        raise LidcError(f"{table_path}: missing column(s) {sorted(missing)}")
    check_crop_paths(nodules, root)
    fold_table = folds if isinstance(folds, pd.DataFrame) else read_folds(folds)
    return nodules.merge(fold_table[["nodule_id", "fold"]], on="nodule_id", how="inner", validate="one_to_one")


def check_crop_paths(nodules: pd.DataFrame, root: Path, table: str = "nodules.csv") -> None:
    """Every ``crop_path`` of a nodule table is relative and stays inside the data folder (a table is
    input like any other file: ``../`` or absolute paths are refused)."""
    base = root.resolve()
    for nodule, rel in zip(nodules["nodule_id"], nodules["crop_path"], strict=True):
        path = Path(str(rel))
        if path.is_absolute() or not (base / path).resolve().is_relative_to(base):
            raise LidcError(f"{root / table}: crop_path of {nodule} ({rel}) leaves the data folder")


def load_planes(data_root: str | Path, table: pd.DataFrame, view: str) -> NodulePlanes:
    """The central ``view`` planes of the crops of ``table``'s rows (``nodule_id``, ``crop_path``)."""
    if view not in VIEWS:
        raise LidcError(f"view {view!r}: the cohort tools read 2-D views ({', '.join(VIEWS)}); a 3-D "
                        "checkpoint is not supported here")
    root = Path(data_root)
    hu, mask, causes = [], [], []
    for nodule, rel in zip(table["nodule_id"], table["crop_path"], strict=True):
        path = root / str(rel)
        try:
            with np.load(path, allow_pickle=False) as crop:
                image, consensus = crop["image"], crop["mask"]
                regions = {k[len(CAUSE_PREFIX):]: crop[k] for k in crop.files if k.startswith(CAUSE_PREFIX)}
        except (OSError, KeyError, ValueError) as err:
            raise LidcError(f"{path}: cannot read the crop of {nodule} ({err})") from None
        if image.ndim != 3 or any(a.shape != image.shape for a in (consensus, *regions.values())):
            raise LidcError(f"{path}: image {image.shape}, mask {consensus.shape} and cause regions are not one "
                            "3-D crop")
        hu.append(slice_plane(image.astype(np.float32), view, CENTRE))
        mask.append(slice_plane(consensus, view, CENTRE) > 0)
        causes.append({t: slice_plane(r, view, CENTRE) > 0 for t, r in regions.items()})
    shape = (0, 32, 32)
    shared = [t for t in causes[0] if all(t in c for c in causes)] if causes else []
    return NodulePlanes(list(table["nodule_id"]), np.stack(hu) if hu else np.zeros(shape, np.float32),
                        np.stack(mask) if mask else np.zeros(shape, bool), view,
                        {t: np.stack([c[t] for c in causes]) for t in shared})


def plane_inputs(planes: np.ndarray, input_stats: dict[str, Any], size: int):
    """Model inputs ``[n, 3, size, size]`` of HU planes ``[n, h, w]``: :func:`model_inputs` on each plane
    (a plane is a one-slice volume along the view's axis, so the transforms are training's own)."""
    import torch

    view = input_stats.get("view", "axial")
    if len(planes) == 0:
        return torch.zeros(0, 3, size, size)
    volume = np.expand_dims(np.asarray(planes, dtype=np.float32), VIEWS[view] + 1)  # [n, ..1.., ...]
    return torch.cat([model_inputs(v, view, [0], input_stats, size) for v in volume])


def checkpoint_input_settings(model) -> tuple[dict[str, Any], int]:
    """``(input_stats, size)`` of a trained checkpoint; :class:`LidcError` when it has no ``input_stats``."""
    stats = dict((getattr(model, "meta", None) or {}).get("input_stats") or {})
    if "mean" not in stats or "std" not in stats:
        source = (model.meta or {}).get("checkpoint_path", "the model")
        raise LidcError(f"{source}: no meta['input_stats'] (mean, std): not a model trained with `lidc-cdam train`")
    size = int(stats.get("image_size", model.default_image_size[0]))
    stats.setdefault("view", "axial")
    return stats, size
