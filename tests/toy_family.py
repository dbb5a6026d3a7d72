"""A toy backbone family, written as a new family is: this one module, then one ``register_adapter`` call
(``tests/test_backbones.py::test_a_new_family_is_one_module_and_one_registration``).

``ToyViT`` is timm's ``VisionTransformer`` with a marker buffer, so its state dict is its own (``toy_marker``) and
the split forward can be timm's; what makes it a family is the adapter: the modules it wraps, how a saved spec
``{"family": "toy", "toy_kwargs": {...}}`` builds one, and how a plain state dict of it is recognised and read.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from lidc_cdam.models.backbones.timm_vit import TimmViTAdapter, infer_vit_kwargs


class ToyViT(VisionTransformer):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.toy_kwargs = dict(kwargs)
        self.register_buffer("toy_marker", torch.ones(1))


class ToyAdapter(TimmViTAdapter):
    family = "toy ViT"
    module_type = ToyViT
    build_family = "toy"
    spec_keys = (None, "toy_kwargs")
    state_dict_format = "toy state dict"

    @classmethod
    def filter_state_dict(cls, state_dict: dict[str, Any], backbone: nn.Module) -> dict[str, Any]:
        return state_dict

    @classmethod
    def build(cls, spec: dict[str, Any]) -> nn.Module:
        return ToyViT(**spec["toy_kwargs"])

    def build_spec(self) -> dict[str, Any] | None:
        return {"family": "toy", "toy_kwargs": dict(self.backbone.toy_kwargs)}

    @classmethod
    def recognises(cls, state_dict: dict[str, Any]) -> bool:
        return "toy_marker" in state_dict

    @classmethod
    def spec_from_state_dict(cls, state_dict: dict[str, Any], arch: str | None, kwargs: dict[str, Any],
                             source: str) -> dict[str, Any]:
        _, inferred = infer_vit_kwargs({k: v for k, v in state_dict.items() if k != "toy_marker"},
                                       kwargs.get("num_heads"), source)
        return {"family": "toy", "toy_kwargs": {**inferred, **kwargs}}
