"""Backbone families behind one seam (:class:`BackboneAdapter`); :func:`adapter_for` picks the adapter by type.

Families: timm ``VisionTransformer``, timm ``Eva`` (DINOv3, EVA-02, PE), torchvision ``VisionTransformer`` (SWAG).
A new family (a 3D ViT, Hugging Face models) is one adapter module and one :func:`register_adapter` call.
"""

from __future__ import annotations

from torch import nn

from lidc_cdam.models.backbones.base import BackboneAdapter, ModelInputError, QKVAttention, TokenLayout
from lidc_cdam.models.backbones.timm_eva import TimmEvaAdapter
from lidc_cdam.models.backbones.timm_vit import TimmViTAdapter
from lidc_cdam.models.backbones.torchvision_vit import TorchvisionViTAdapter

#: adapters in the order they are tried (the first whose ``module_type`` matches wins)
ADAPTERS: list[type[BackboneAdapter]] = [TimmViTAdapter, TimmEvaAdapter, TorchvisionViTAdapter]


def register_adapter(adapter: type[BackboneAdapter]) -> type[BackboneAdapter]:
    """Add a family (usable as a class decorator); later registrations take precedence."""
    ADAPTERS.insert(0, adapter)
    return adapter


def adapter_type(backbone: nn.Module) -> type[BackboneAdapter]:
    """The adapter class for ``backbone``'s type; ``TypeError`` naming the supported families otherwise."""
    for adapter in ADAPTERS:
        if isinstance(backbone, adapter.module_type):
            return adapter
    families = ", ".join(a.family for a in ADAPTERS)
    raise TypeError(
        f"ViTModel wraps a Vision Transformer of a supported family ({families}), got {type(backbone).__name__}. "
        "Create one with timm.create_model('vit_...') or lidc_cdam.ViTModel.from_timm(name)."
    )


def adapter_for(backbone: nn.Module) -> BackboneAdapter:
    """The adapter for ``backbone`` (its structure checked)."""
    return adapter_type(backbone)(backbone)


__all__ = [
    "ADAPTERS",
    "BackboneAdapter",
    "ModelInputError",
    "QKVAttention",
    "TimmEvaAdapter",
    "TimmViTAdapter",
    "TokenLayout",
    "TorchvisionViTAdapter",
    "adapter_for",
    "adapter_type",
    "register_adapter",
]
