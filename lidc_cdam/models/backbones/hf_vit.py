"""Hugging Face ``transformers`` ViTs (the ``hf`` extra): ``ViTModel`` / ``ViTForImageClassification`` and
``Dinov2Model`` / ``Dinov2WithRegistersModel`` (and their ``ForImageClassification``), as laid out in
transformers 5 (``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` attention).

Pre-norm layers: ``x = X + attn(norm_before(X)); Y = x + mlp(norm_after(x))`` (DINOv2 with layer scale), then
``layernorm``. q, k and v are three affine maps of the normed tokens, stacked here into one ``qkv`` map, then
softmax attention: the CLS-row closed form is exact (docs/method.md, "Backbone families and 3D"). The latent is CLS'
(``last_hidden_state[:, 0]``); ``Dinov2*ForImageClassification`` reads ``[CLS', mean of the patch tokens']``
(rows path). A base ``ViTModel``'s optional ``pooler`` is not used: the latent is CLS', its head ``Identity``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import transformers
from torch import nn
from torch.nn import functional as F

from lidc_cdam.models.backbones.base import BackboneAdapter, QKVAttention, reads, split_heads

#: the classes a checkpoint may name (``build["transformers_class"]``), and the attribute of their inner model
HF_CLASSES: dict[str, str | None] = {
    "ViTModel": None,
    "ViTForImageClassification": "vit",
    "Dinov2Model": None,
    "Dinov2ForImageClassification": "dinov2",
    "Dinov2WithRegistersModel": None,
    "Dinov2WithRegistersForImageClassification": "dinov2_with_registers",
}


def _classes(names: tuple[str, ...]) -> tuple[type[nn.Module], ...]:
    return tuple(getattr(transformers, n) for n in names if n in HF_CLASSES and hasattr(transformers, n))


def build_hf_backbone(class_name: str, config: dict[str, Any]) -> nn.Module:
    """``transformers.<class_name>(<its config class>.from_dict(config))``, randomly initialised (no download)."""
    if class_name not in HF_CLASSES or not hasattr(transformers, class_name):
        raise ValueError(f"unsupported transformers class {class_name!r}; supported: {', '.join(HF_CLASSES)}")
    cls = getattr(transformers, class_name)
    return cls(cls.config_class.from_dict(dict(config)))


class HFAdapterBase(BackboneAdapter):
    """What the transformers ViT and DINOv2 families share: the inner model, stacked q/k/v, the head."""

    size_hint = "resize the images (this transformers model takes one image size)"
    class_names: ClassVar[tuple[str, ...]]
    build_family = "transformers"

    @classmethod
    def build(cls, spec: dict[str, Any]) -> nn.Module:
        """:func:`build_hf_backbone` of ``{"family": "transformers", "transformers_class": name,
        "transformers_config": {...}}``."""
        return build_hf_backbone(spec["transformers_class"], dict(spec.get("transformers_config") or {}))

    @classmethod
    def check(cls, backbone: nn.Module) -> None:
        attn = cls.layers_of(cls.inner_of(backbone))[-1].attention
        missing = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj") if not isinstance(getattr(attn, n, None),
                                                                                        nn.Linear)]
        if missing:
            raise TypeError(f"{type(backbone).__name__}: the last attention has no {missing} (the transformers 5 "
                            f"layout); installed transformers {transformers.__version__}")

    @staticmethod
    def inner_of(backbone: nn.Module) -> nn.Module:
        attr = HF_CLASSES.get(type(backbone).__name__)
        return getattr(backbone, attr) if attr else backbone

    @staticmethod
    def layers_of(inner: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def inner(self) -> nn.Module:
        return self.inner_of(self.backbone)

    @property
    def config(self) -> Any:
        return self.inner.config

    def build_spec(self) -> dict[str, Any] | None:
        return {"family": "transformers", "transformers_class": type(self.backbone).__name__,
                "transformers_config": self.backbone.config.to_diff_dict()}

    # ------------------------------------------------------------------ layout
    embed_dim = reads("config.hidden_size", int)

    @property
    def has_class_token(self) -> bool:
        return True

    in_chans = reads("config.num_channels", int)

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.inner.embeddings.patch_embeddings.patch_size)

    @property
    def default_image_size(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.inner.embeddings.patch_embeddings.image_size)

    def grid(self, image_size: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(s // p for s, p in zip(image_size, self.patch_size, strict=True))

    @property
    def depth(self) -> int:
        return len(self.layers_of(self.inner))

    num_heads = reads("last_block.attention.num_attention_heads", int)

    @property
    def num_classes(self) -> int:
        return int(self.backbone.classifier.out_features) if isinstance(self.head, nn.Linear) else 0

    # ----------------------------------------------------------- split forward
    @property
    def last_block(self) -> nn.Module:
        return self.layers_of(self.inner)[-1]

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        x = self.inner.embeddings(images)
        for layer in self.layers_of(self.inner)[:-1]:
            x = layer(x, None)
        return x

    def final_norm(self, y: torch.Tensor) -> torch.Tensor:
        return self.inner.layernorm(y)

    def _reads_patch_mean(self) -> bool:
        return type(self.backbone).__name__.startswith("Dinov2") and self.backbone is not self.inner

    def pool(self, z: torch.Tensor) -> torch.Tensor:
        if self._reads_patch_mean():  # [CLS', mean of the patch tokens'] as Dinov2*ForImageClassification
            return torch.cat([z[..., 0, :], z[..., self.num_prefix_tokens:, :].mean(-2)], dim=-1)
        return z[..., 0, :]

    def pooled_rows(self, num_tokens: int) -> slice:
        return slice(0, None) if self._reads_patch_mean() else slice(0, 1)

    def _projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.last_block.attention
        layers = (attn.q_proj, attn.k_proj, attn.v_proj)
        weight = torch.cat([p.weight for p in layers])
        if layers[0].bias is None:
            return weight, weight.new_zeros(weight.shape[0])
        return weight, torch.cat([p.bias for p in layers])

    def qkv_attention(self, grid: tuple[int, ...] | None) -> QKVAttention | None:
        attn = self.last_block.attention
        weight, bias = self._projections()
        return QKVAttention(weight, bias, int(attn.num_attention_heads), int(attn.head_dim), float(attn.scaling))

    def attention_probs(self, tokens: torch.Tensor, grid: tuple[int, ...] | None, query: slice) -> torch.Tensor:
        attn = self.last_block.attention
        weight, bias = self._projections()
        q, k, _ = (split_heads(p, attn.num_attention_heads) for p in F.linear(tokens, weight, bias).chunk(3, dim=-1))
        return ((q[..., query, :] * attn.scaling) @ k.transpose(-2, -1)).softmax(dim=-1)

    def finish(self, resid_rows: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        y = self._rest(resid_rows, self.last_block.attention.o_proj(heads))
        return self.pool(self.inner.layernorm(y))

    def block(self, resid: torch.Tensor, tokens: torch.Tensor, grid: tuple[int, ...] | None) -> torch.Tensor:
        return self._rest(resid, self.last_block.attention(tokens)[0])

    def _rest(self, resid: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """The last layer after its attention: residual, (layer scale,) norm, MLP."""
        raise NotImplementedError

    # ------------------------------------------------------------------ head
    @property
    def head(self) -> nn.Module:
        return self.backbone.classifier if self.backbone is not self.inner else nn.Identity()

    def remove_head(self) -> None:
        if self.backbone is not self.inner:
            self.backbone.classifier = nn.Identity()


class HFViTAdapter(HFAdapterBase):
    """transformers ``ViTModel`` / ``ViTForImageClassification``: CLS, one fixed image size."""

    family = "transformers ViT"
    class_names = ("ViTModel", "ViTForImageClassification")
    module_type = _classes(class_names)

    @staticmethod
    def layers_of(inner: nn.Module) -> nn.ModuleList:
        return inner.layers

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    @property
    def norm1(self) -> nn.Module:
        return self.last_block.layernorm_before

    def _rest(self, resid: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        layer = self.last_block
        y = resid + layer.dropout(attn_out)
        return y + layer.dropout(layer.mlp(layer.layernorm_after(y)))


class HFDinov2Adapter(HFAdapterBase):
    """transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (+ ``ForImageClassification``): CLS, registers,
    layer scale; any image size that is a multiple of the patch size (position embeddings interpolated)."""

    family = "transformers DINOv2"
    class_names = ("Dinov2Model", "Dinov2ForImageClassification", "Dinov2WithRegistersModel",
                   "Dinov2WithRegistersForImageClassification")
    module_type = _classes(class_names)

    @staticmethod
    def layers_of(inner: nn.Module) -> nn.ModuleList:
        return inner.encoder.layer

    @property
    def strict_image_size(self) -> bool:
        return False

    @property
    def default_image_size(self) -> tuple[int, ...]:
        size = self.config.image_size
        return tuple(int(s) for s in (size if isinstance(size, list | tuple) else (size, size)))

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + int(getattr(self.config, "num_register_tokens", 0) or 0)

    @property
    def norm1(self) -> nn.Module:
        return self.last_block.norm1

    def _rest(self, resid: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        layer = self.last_block
        y = resid + layer.drop_path(layer.layer_scale1(attn_out))
        return y + layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(y))))


__all__ = ["HF_CLASSES", "HFDinov2Adapter", "HFViTAdapter", "build_hf_backbone"]
