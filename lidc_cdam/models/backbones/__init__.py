"""Backbone families behind one seam (:class:`BackboneAdapter`); :func:`adapter_for` picks the adapter by type.

Families: timm ``VisionTransformer``, timm ``Eva`` (DINOv3, EVA-02, PE), torchvision ``VisionTransformer`` (SWAG),
and, imported only when a model of theirs is wrapped, Hugging Face ``transformers`` ViT / DINOv2
(:mod:`~lidc_cdam.models.backbones.hf_vit`, the ``hf`` extra) and MONAI's 2D / 3D ``ViT``
(:mod:`~lidc_cdam.models.backbones.monai_vit`, needs ``einops``). :mod:`.base` is the seam itself; the built-in
adapters are :mod:`.timm_vit`, :mod:`.timm_eva` and :mod:`.torchvision_vit`.

This is the one registry of families: an adapter says which modules it wraps (``module_type``), how its family is
built from a saved spec (``build_family``, ``build``: :func:`build_backbone`) and how a plain state dict of it is
recognised and read (``recognises``, ``spec_from_state_dict``: :func:`adapter_for_state_dict`). A new family is
one adapter module and one :func:`register_adapter` call (or an entry of :data:`LAZY_FAMILIES`): wrapping,
explaining, saving and loading its models then work (``tests/test_backbones.py`` adds a toy family so).
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from lidc_cdam.models.backbones.base import (
    BackboneAdapter,
    CheckpointError,
    ModelInputError,
    QKVAttention,
    TokenLayout,
)
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
#: classes (registered after the built-in ones when a model of that package is first wrapped, or a saved spec of
#: it first built), family names and the ``build["family"]`` of its saved specs
LAZY_FAMILIES: list[tuple[str, str, tuple[str, ...], tuple[str, ...], str]] = [
    ("transformers", "lidc_cdam.models.backbones.hf_vit", ("HFViTAdapter", "HFDinov2Adapter"),
     ("transformers ViT", "transformers DINOv2"), "transformers"),
    ("monai", "lidc_cdam.models.backbones.monai_vit", ("MonaiViTAdapter",), ("MONAI ViT",), "monai"),
]

#: the family of a saved spec without ``"family"`` (the first checkpoints: timm's)
DEFAULT_BUILD_FAMILY = "timm"


def _load_lazy_family(package: str | None = None, build_family: str | None = None) -> None:
    """Import and register the adapters of a library (the top-level ``package`` of a model's class), or of the
    family that builds ``build_family`` specs."""
    for owner, module, classes, _, builds in LAZY_FAMILIES:
        if owner == package or builds == build_family:
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
            _load_lazy_family(package=type(backbone).__module__.split(".")[0])
    families = ", ".join(family_names())
    raise TypeError(
        f"ViTModel wraps a Vision Transformer of a supported family ({families}), got {type(backbone).__name__}. "
        "Create one with timm.create_model('vit_...') or lidc_cdam.ViTModel.from_timm(name)."
    )


def adapter_for(backbone: nn.Module) -> BackboneAdapter:
    """The adapter for ``backbone`` (its structure checked)."""
    return adapter_type(backbone)(backbone)


def builder_for(build_family: str) -> type[BackboneAdapter]:
    """The adapter that builds saved specs of ``build_family``; :class:`CheckpointError` naming the known ones."""
    for attempt in range(2):
        for adapter in ADAPTERS:
            if adapter.build_family == build_family:
                return adapter
        if attempt == 0:
            _load_lazy_family(build_family=build_family)
    known = [a.build_family for a in ADAPTERS if a.build_family] + [f[-1] for f in LAZY_FAMILIES]
    raise CheckpointError(f"unknown backbone family {build_family!r} in the saved spec; known: "
                          f"{', '.join(dict.fromkeys(known))}")


def build_backbone(build: dict[str, Any]) -> nn.Module:
    """A randomly initialised backbone from a saved spec (``ViTModel.build``): ``{"family": F, ...}`` built by the
    adapter whose ``build_family`` is ``F`` (without ``"family"``: timm's, ``{"timm_name": name | None,
    "timm_kwargs": {...}}``). The built-in specs: ``timm`` (above), ``torchvision`` (``torchvision_name``,
    ``torchvision_kwargs``), ``monai`` (``monai_kwargs``), ``transformers`` (``transformers_class``,
    ``transformers_config``)."""
    return builder_for(build.get("family", DEFAULT_BUILD_FAMILY)).build(build)


def adapter_for_state_dict(state_dict: dict[str, Any]) -> type[BackboneAdapter] | None:
    """The first registered adapter that recognises a plain state dict, or ``None``."""
    return next((adapter for adapter in ADAPTERS if adapter.recognises(state_dict)), None)


__all__ = [
    "ADAPTERS",
    "DEFAULT_BUILD_FAMILY",
    "LAZY_FAMILIES",
    "BackboneAdapter",
    "CheckpointError",
    "ModelInputError",
    "QKVAttention",
    "TimmEvaAdapter",
    "TimmViTAdapter",
    "TokenLayout",
    "TorchvisionViTAdapter",
    "adapter_for",
    "adapter_for_state_dict",
    "adapter_type",
    "build_backbone",
    "builder_for",
    "family_names",
    "register_adapter",
]
