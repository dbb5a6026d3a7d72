"""Building and loading models: timm names, our checkpoints, official DINO / DINOv2 files.

Checkpoints are untrusted input: every file is read with ``torch.load(weights_only=True)`` (or
``safetensors``), so a file that carries pickled Python objects is refused instead of run.

Formats :func:`load_model` understands:

* lidc-cdam checkpoints written by :func:`save_checkpoint` (backbone, head, output names, meta);
* official DINO backbones (``dino_deitsmall8_pretrain.pth``: a state dict with timm ViT keys) and
  DINO training checkpoints (``{"teacher": ..., "student": ...}``, ``module.`` / ``backbone.``
  prefixes; the teacher backbone is taken and the DINO projection head dropped);
* official DINOv2 backbones (``mask_token``, ``register_tokens``, layer scale), converted with
  timm's ``checkpoint_filter_fn``;
* plain timm ``VisionTransformer`` state dicts (also under a ``model`` / ``state_dict`` key).

The code is in :mod:`lidc_cdam.models.checkpoint_format`, which takes the model class as an argument (so
``ViTModel.from_checkpoint`` / ``from_timm`` / ``save`` use it without importing this module), and in the family
adapters (:mod:`lidc_cdam.models.backbones`: building a backbone from a saved spec, reading a family's plain state
dict); the functions here bind it to :class:`~lidc_cdam.models.vit.ViTModel`, and the other names are re-exported.
"""

from __future__ import annotations

import os
from typing import Any

from lidc_cdam.models.backbones import build_backbone
from lidc_cdam.models.backbones.base import NUM_HEADS, CheckpointError, PretrainedWeightsUnavailable
from lidc_cdam.models.backbones.timm_vit import infer_vit_kwargs
from lidc_cdam.models.checkpoint_format import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    build_model_from_payload,
    extract_state_dict,
    is_lidc_cdam_checkpoint,
    load_model_file,
    model_from_timm,
    read_checkpoint,
    save_checkpoint,
)
from lidc_cdam.models.vit import ViTModel

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "NUM_HEADS",
    "CheckpointError",
    "PretrainedWeightsUnavailable",
    "build_backbone",
    "extract_state_dict",
    "from_timm",
    "infer_vit_kwargs",
    "is_lidc_cdam_checkpoint",
    "load_model",
    "model_from_payload",
    "read_checkpoint",
    "save_checkpoint",
]


def model_from_payload(payload: dict[str, Any], source: str = "checkpoint") -> ViTModel:
    """Rebuild a :class:`ViTModel` from a loaded lidc-cdam checkpoint dictionary."""
    return build_model_from_payload(ViTModel, payload, source)


def load_model(path: str | os.PathLike, *, arch: str | None = None, **timm_kwargs: Any) -> ViTModel:
    """Load a model file: a lidc-cdam checkpoint, an official DINO / DINOv2 backbone, a DINO
    training checkpoint (teacher) or a timm ViT state dict. Read with ``weights_only=True``.

    For files without an architecture it is inferred from the tensor shapes; ``arch`` (a timm model
    name) overrides the inference and ``timm_kwargs`` (e.g. ``num_heads=``, ``img_size=``,
    ``dynamic_img_size=True``) override single arguments. Backbone-only files give a
    ``task="features"`` model that :func:`save_checkpoint` can re-save.
    """
    return load_model_file(ViTModel, path, arch=arch, **timm_kwargs)


def from_timm(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    **kwargs: Any,
) -> ViTModel:
    """``timm.create_model(name, pretrained=..., **kwargs)`` as a :class:`ViTModel`.

    With ``checkpoint`` the weights come from that local file instead of the network (our format,
    a DINO / DINOv2 file or a timm state dict, converted with timm's ``checkpoint_filter_fn``).
    Without network access ``pretrained=True`` raises :class:`PretrainedWeightsUnavailable`.
    """
    return model_from_timm(ViTModel, name, pretrained=pretrained, checkpoint=checkpoint, **kwargs)
