"""ViT backbones with heads, split at the last block, and their checkpoint formats."""

from lidc_cdam.models.vit import ModelInputError, TokenLayout, ViTModel

__all__ = ["ModelInputError", "TokenLayout", "ViTModel"]
