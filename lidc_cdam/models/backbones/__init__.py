"""Backbone families behind one seam (:class:`BackboneAdapter`); :func:`adapter_for` picks the adapter by type.

Families: timm ``VisionTransformer``, timm ``Eva`` (DINOv3, EVA-02, PE), torchvision ``VisionTransformer`` (SWAG),
and, imported only when a model of theirs is wrapped, Hugging Face ``transformers`` ViT / DINOv2
(:mod:`~lidc_cdam.models.backbones.hf_vit`, the ``hf`` extra) and MONAI's 2D / 3D ``ViT``
(:mod:`~lidc_cdam.models.backbones.monai_vit`, needs ``einops``). :mod:`.base` is the seam itself; the built-in
adapters are :mod:`.timm_vit`, :mod:`.timm_eva` and :mod:`.torchvision_vit`. A new family is one adapter module and one
:func:`register_adapter` call (or an entry of :data:`LAZY_FAMILIES`).
"""

from __future__ import annotations

import importlib

from torch import nn

from lidc_cdam.models.backbones.base import BackboneAdapter, ModelInputError, QKVAttention, TokenLayout
from lidc_cdam.models.backbones.timm_eva import TimmEvaAdapter
from lidc_cdam.models.backbones.timm_vit import TimmViTAdapter
from lidc_cdam.models.backbones.torchvision_vit import TorchvisionViTAdapter

#: adapters in the order they are tried (the first whose ``module_type`` matches wins)
ADAPTERS: list[type[BackboneAdapter]] = [TimmViTAdapter, TimmEvaAdapter, TorchvisionViTAdapter]


def register_adapter(adapter: type[BackboneAdapter], *, first: bool = True) -> type[BackboneAdapter]:
    """Add a family (usable as a class decorator); later registrations take precedence unless ``first=False``."""
    if adapter not in ADAPTERS:
        ADAPTERS.insert(0 if first else len(ADAPTERS), adapter)
    return adapter


#: families whose libraries load on demand: top-level package of the model's class, adapter module, its adapter
#: classes (registered after the built-in ones when a model of that package is first wrapped) and family names
LAZY_FAMILIES: list[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = [
    ("transformers", "lidc_cdam.models.backbones.hf_vit", ("HFViTAdapter", "HFDinov2Adapter"),
     ("transformers ViT", "transformers DINOv2")),
    ("monai", "lidc_cdam.models.backbones.monai_vit", ("MonaiViTAdapter",), ("MONAI ViT",)),
]


def _load_lazy_family(backbone: nn.Module) -> None:
    """Import and register the adapters of the library that ``backbone``'s class comes from."""
    package = type(backbone).__module__.split(".")[0]
    for owner, module, classes, _ in LAZY_FAMILIES:
        if owner == package:
            loaded = importlib.import_module(module)
            for name in classes:
                register_adapter(getattr(loaded, name), first=False)


def family_names() -> list[str]:
    """Every supported family, built-in ones first."""
    names = [a.family for a in ADAPTERS]
    return names + [n for *_, family in LAZY_FAMILIES for n in family if n not in names]


def adapter_type(backbone: nn.Module) -> type[BackboneAdapter]:
    """The adapter class for ``backbone``'s type; ``TypeError`` naming the supported families otherwise."""
    for attempt in range(2):
        for adapter in ADAPTERS:
            if isinstance(backbone, adapter.module_type):
                return adapter
        if attempt == 0:
            _load_lazy_family(backbone)
    families = ", ".join(family_names())
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
    "family_names",
    "register_adapter",
]
