"""Building and loading models: timm names, our checkpoints, official DINO / DINOv2 files.

Checkpoints are untrusted input: every file is read with ``torch.load(weights_only=True)``, so a
file that carries pickled Python objects is refused instead of run.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from lidc_cdam.models.heads import LinearHead, build_head
from lidc_cdam.models.vit import ViTModel

CHECKPOINT_FORMAT = "lidc-cdam-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (unsafe, unknown format, wrong shapes); names the file."""


def read_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file and say what to do."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to load: the file contains pickled Python objects that could run code "
            f"when loaded ({err.__class__.__name__}: {str(err).splitlines()[0]}). Checkpoints must hold "
            "only tensors and plain containers; re-save it with torch.save(model.state_dict(), ...)."
        ) from None
    except Exception as err:  # truncated / not a torch file
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({err.__class__.__name__}: {err})") from None


def build_backbone(build: dict[str, Any]) -> VisionTransformer:
    """A randomly initialised backbone from ``{"timm_name": name | None, "timm_kwargs": {...}}``."""
    kwargs = dict(build.get("timm_kwargs") or {})
    name = build.get("timm_name")
    model = timm.create_model(name, pretrained=False, **kwargs) if name else VisionTransformer(**kwargs)
    return model


def save_checkpoint(model: ViTModel, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (weights + everything needed to rebuild it) atomically to ``path``.

    The file holds only tensors and plain Python values, so it loads with ``weights_only=True``.
    """
    if not model.build:
        raise ValueError(
            "this ViTModel does not know how to rebuild its backbone: create it with "
            "ViTModel.from_timm(...) / from_config(...), or pass build={'timm_name': ..., 'timm_kwargs': {...}}"
        )
    head = model.head.config() if isinstance(model.head, LinearHead) else None
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "backbone": dict(model.build),
        "head": head,
        "task": model.task,
        "output_names": model.output_names,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": {**model.meta, **(meta or {})},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def model_from_payload(payload: dict[str, Any], source: str = "checkpoint") -> ViTModel:
    """Rebuild a :class:`ViTModel` from a loaded lidc-cdam checkpoint dictionary."""
    if payload.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{source}: written by a newer lidc-cdam (format version {payload['version']})")
    backbone = build_backbone(payload["backbone"])
    model = ViTModel(
        backbone,
        build_head(payload.get("head")),
        task=payload.get("task", "classification"),
        output_names=payload.get("output_names"),
        build=payload["backbone"],
        meta=payload.get("meta") or {},
    )
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"{source}: weights do not fit the architecture it names: {err}") from None
    return model.eval()


def is_lidc_cdam_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT
