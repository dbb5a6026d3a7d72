"""ViT backbones with heads, split at the last block, and their checkpoint formats."""

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
