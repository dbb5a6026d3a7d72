"""A checked LIDC-IDRI checkpoint: the model, its targets, the input statistics it was trained with.

:func:`load_checked_model` loads a ``best.pt`` of ``lidc-cdam train`` (weights only) and refuses, with a
clear :class:`~lidc_cdam.ct.errors.CTError`, a checkpoint trained for another task or one without the
training crops' input statistics (``meta["input_stats"]``). :func:`predictions` turns the model's outputs
into the units a radiologist reads (malignancy as a probability, biomarkers in rating units).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lidc_cdam.ct.errors import CTError
from lidc_cdam.data.lidc.nodules import BIOMARKERS
from lidc_cdam.models.loading import CheckpointError, load_model

MALIGNANCY = "malignancy"


@dataclass
class LoadedModel:
    """A checked checkpoint: the model, its targets (display names) and input statistics."""

    path: Path
    model: Any
    targets: list[str]  # "malignancy" or biomarker names, in output order
    input_stats: dict[str, Any]
    target_stats: dict[str, Any] | None
    fingerprint: str

    @property
    def task(self) -> str:
        return "malignancy" if self.targets == [MALIGNANCY] else "biomarkers"

    @property
    def image_size(self) -> int:
        size = self.input_stats.get("image_size") or self.model.default_image_size[0]
        return int(size[0] if isinstance(size, list | tuple) else size)

    @property
    def view(self) -> str:
        return str(self.input_stats.get("view", "axial"))

    @property
    def device(self) -> Any:
        """The device the model's weights are on (inputs go there)."""
        return next(self.model.parameters()).device

    def to(self, device: Any) -> LoadedModel:
        """The model moved to ``device`` (a :class:`torch.device`, e.g. from :func:`lidc_cdam.device.resolve_device`),
        in place: the loaded model is shared by everyone who loaded this file."""
        self.model.to(device)
        return self


def file_fingerprint(path: str | Path) -> str:
    """sha256 (16 hex digits) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def check_model(model: Any, source: str = "checkpoint") -> tuple[list[str], dict[str, Any], dict[str, Any] | None]:
    """``(targets, input_stats, target_stats)`` of an LIDC model; :class:`CTError` when the checkpoint
    was trained for another task or lacks the input statistics needed to build its input."""
    names = list(model.output_names or [])
    task = getattr(model, "task", None)
    if task == "classification" and names == ["malignant"]:
        targets = [MALIGNANCY]
    elif task == "regression" and names and set(names) <= set(BIOMARKERS):
        targets = names
    else:
        what = f"task {task!r}, {model.num_outputs} output(s)" + (f" named {names[:5]}" if names else "")
        raise CTError(
            f"{source}: a checkpoint for another task ({what}); the viewer needs an LIDC-IDRI model from "
            "`lidc-cdam train`: malignancy (one output 'malignant') or the eight biomarkers")
    stats = dict(model.meta.get("input_stats") or {})
    if "mean" not in stats or "std" not in stats:
        raise CTError(f"{source}: no input statistics (meta['input_stats'] with 'mean' and 'std' of the "
                      "training crops' HU), so the model input cannot be built as in training")
    target_stats = model.meta.get("target_stats") if targets != [MALIGNANCY] else None
    return targets, stats, target_stats


_models: dict[tuple[str, int, int], LoadedModel] = {}
_models_lock = threading.Lock()


def load_checked_model(path: str | Path) -> LoadedModel:
    """Load (weights only) and check a checkpoint; kept in memory while the file does not change."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CTError(f"{path}: no such checkpoint file")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _models_lock:
        if key in _models:
            return _models[key]
    try:
        model = load_model(path)
    except CheckpointError as err:
        raise CTError(str(err)) from None
    targets, stats, target_stats = check_model(model, str(path))
    loaded = LoadedModel(path, model.eval(), targets, stats, target_stats, file_fingerprint(path))
    with _models_lock:
        _models[key] = loaded
    return loaded


def predictions(loaded: LoadedModel, logits: np.ndarray) -> dict[str, float]:
    """Model outputs on the central slice in the units a radiologist reads."""
    out: dict[str, float] = {}
    if loaded.targets == [MALIGNANCY]:
        out[MALIGNANCY] = float(1.0 / (1.0 + np.exp(-float(logits[0]))))
        return out
    ts = loaded.target_stats or {}
    names = list(ts.get("names") or [])
    for k, name in enumerate(loaded.targets):
        value = float(logits[k])
        if name in names:
            j = names.index(name)
            value = value * float(ts["std"][j]) + float(ts["mean"][j])
        out[name] = value
    return out
