"""MONAI ``ViT`` (``monai.networks.nets.ViT``), 2D or 3D, with ``classification=True``: CLS token, CLS pooling.

``TransformerBlock``: ``x = X + attn(norm1(X)); Y = x + mlp(norm2(x))``; then ``norm`` and ``Z[:, 0]`` into
``classification_head`` (``Linear`` + ``Tanh`` by default). ``SABlock`` computes q, k, v with one affine map
(``qkv``, laid out ``(qkv, head, e)`` as timm's; or ``to_q`` / ``to_k`` / ``to_v``, stacked here) then softmax
attention, so ``norm1`` is Eq. 2's ``T`` and the CLS-row closed form is exact (docs/method.md,
"Backbone families and 3D").
The CLS token gets no position embedding (MONAI adds it to the patches only). Patch tokens follow the input's
spatial axes: images ``[B, C, D, H, W]`` give a ``(gd, gh, gw)`` grid. Needs ``einops``.
"""

from __future__ import annotations

import math
from operator import itemgetter
from typing import Any

import torch
from monai.networks.blocks.selfattention import SABlock
from monai.networks.blocks.transformerblock import TransformerBlock
from monai.networks.nets.vit import ViT
from torch import nn

from lidc_cdam.models.backbones.base import (
    BackboneAdapter,
    ClassTokenPooling,
    QKVAttention,
    all_but_last,
    reads,
    split_heads,
    with_class_token,
)


def build_monai_vit(kwargs: dict[str, Any]) -> ViT:
    """``monai.networks.nets.ViT(**kwargs)`` that remembers its ``img_size`` (MONAI keeps only the patch count)."""
    backbone = ViT(**kwargs)
    dims = int(kwargs.get("spatial_dims", 3))
    size = kwargs["img_size"]
    backbone.img_size = tuple(int(s) for s in (size if isinstance(size, list | tuple) else [size] * dims))
    backbone.monai_kwargs = dict(kwargs)
    return backbone


class MonaiViTAdapter(ClassTokenPooling, BackboneAdapter):
    """MONAI ``ViT`` with ``classification=True``: one fixed image size, CLS pooling, any number of spatial dims."""

    family = "MONAI ViT"
    module_type = ViT
    size_hint = "resize (resample) the volumes: a MONAI ViT takes one image size"
    build_family = "monai"
    spec_keys = (None, "monai_kwargs")

    @classmethod
    def build(cls, spec: dict[str, Any]) -> nn.Module:
        """:func:`build_monai_vit` of ``{"family": "monai", "monai_kwargs": {...}}``."""
        return build_monai_vit(dict(spec.get("monai_kwargs") or {}))

    @classmethod
    def check(cls, backbone: nn.Module) -> None:
        if not getattr(backbone, "classification", False) or not hasattr(backbone, "cls_token"):
            raise TypeError("MONAI ViT: build it with classification=True (a CLS token and a head reading it); "
                            "without it the model has no latent to explain")
        for i, blk in enumerate(backbone.blocks):
            if not isinstance(blk, TransformerBlock) or not isinstance(blk.attn, SABlock):
                raise TypeError(f"MONAI ViT: block {i} is {type(blk).__name__}, not a TransformerBlock with SABlock")
            if blk.with_cross_attention:
                raise TypeError(f"MONAI ViT: block {i} has cross-attention; CDAM needs self-attention blocks")
        cls.image_size_of(backbone)

    def unused_parameters(self) -> set[str]:
        """Every block's ``norm_cross_attn``: MONAI builds it even without cross-attention, and never uses it."""
        return {f"blocks.{i}.norm_cross_attn.{name}" for i, blk in enumerate(self.backbone.blocks)
                if not blk.with_cross_attention for name, _ in blk.norm_cross_attn.named_parameters()}

    @staticmethod
    def patch_size_of(backbone: nn.Module) -> tuple[int, ...]:
        proj = backbone.patch_embedding.patch_embeddings
        if isinstance(proj, nn.Sequential):  # "perceptron": Rearrange with p1, p2 (, p3), then Linear
            lengths = dict(proj[0].axes_lengths)
            return tuple(int(lengths[f"p{i + 1}"]) for i in range(len(lengths)))
        return tuple(int(k) for k in proj.kernel_size)

    @classmethod
    def image_size_of(cls, backbone: nn.Module) -> tuple[int, ...]:
        """``backbone.img_size`` if set (:func:`build_monai_vit` sets it), else the cube (square) that fits the
        patch count."""
        size = getattr(backbone, "img_size", None)
        if size is not None:
            return tuple(int(s) for s in size)
        patch = cls.patch_size_of(backbone)
        n = int(backbone.patch_embedding.n_patches)
        side = round(n ** (1 / len(patch)))
        if side ** len(patch) != n:
            raise TypeError(f"MONAI ViT: cannot tell the image size of a non-cubic grid of {n} patches; set "
                            "vit.img_size = (D, H, W) or build it with lidc_cdam.models.backbones.build_monai_vit")
        return tuple(side * p for p in patch)

    def build_spec(self) -> dict[str, Any] | None:
        kwargs = getattr(self.backbone, "monai_kwargs", None)
        return {"family": "monai", "monai_kwargs": dict(kwargs)} if kwargs is not None else None

    # ------------------------------------------------------------------ layout
    embed_dim = reads("backbone.norm.normalized_shape", itemgetter(0))

    @property
    def in_chans(self) -> int:
        pe = self.backbone.patch_embedding
        if isinstance(pe.patch_embeddings, nn.Sequential):
            return int(pe.patch_dim) // math.prod(self.patch_size)
        return int(pe.patch_embeddings.in_channels)

    @property
    def patch_size(self) -> tuple[int, ...]:
        return self.patch_size_of(self.backbone)

    @property
    def default_image_size(self) -> tuple[int, ...]:
        return self.image_size_of(self.backbone)

    depth = reads("backbone.blocks", len)
    num_heads = reads("last_block.attn.num_heads", int)

    def grid(self, image_size: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(s // p for s, p in zip(image_size, self.patch_size, strict=True))

    @property
    def num_classes(self) -> int:
        head = self.backbone.classification_head
        linear = head if isinstance(head, nn.Linear) else next((m for m in head.modules() if isinstance(m, nn.Linear)),
                                                              None)
        return int(linear.out_features) if linear is not None else 0

    # ----------------------------------------------------------- split forward
    last_block = reads("backbone.blocks", itemgetter(-1))
    norm1 = reads("last_block.norm1")

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        return all_but_last(bb.blocks, with_class_token(bb.patch_embedding(images), bb.cls_token))

    def block(self, resid: torch.Tensor, tokens: torch.Tensor, grid: tuple[int, ...] | None) -> torch.Tensor:
        blk = self.last_block
        y = resid + blk.attn(tokens)
        return y + blk.mlp(blk.norm2(y))

    def final_norm(self, y: torch.Tensor) -> torch.Tensor:
        return self.backbone.norm(y)

    def _projections(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn = self.last_block.attn
        if attn.use_combined_linear:
            return attn.qkv.weight, attn.qkv.bias
        layers = (attn.to_q, attn.to_k, attn.to_v)
        bias = None if layers[0].bias is None else torch.cat([p.bias for p in layers])
        return torch.cat([p.weight for p in layers]), bias

    def qkv_attention(self, grid: tuple[int, ...] | None) -> QKVAttention | None:
        attn = self.last_block.attn
        if attn.rel_positional_embedding is not None or attn.causal or attn.attention_dtype is not None:
            return None
        weight, bias = self._projections()
        bias = bias if bias is not None else weight.new_zeros(weight.shape[0])
        return QKVAttention(weight, bias, int(attn.num_heads), int(attn.dim_head), float(attn.scale))

    def finish(self, resid_rows: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        blk = self.last_block
        y = resid_rows + blk.attn.drop_output(blk.attn.out_proj(heads))
        y = y + blk.mlp(blk.norm2(y))
        return self.backbone.norm(y)[..., 0, :]

    def attention_probs(self, tokens: torch.Tensor, grid: tuple[int, ...] | None, query: slice) -> torch.Tensor:
        attn = self.last_block.attn
        weight, bias = self._projections()
        q, k, _ = (split_heads(p, attn.num_heads) for p in
                   torch.nn.functional.linear(tokens, weight, bias).chunk(3, dim=-1))
        return ((q[..., query, :] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)

    # ------------------------------------------------------------------ head
    head = reads("backbone.classification_head")

    def remove_head(self) -> None:
        self.backbone.classification_head = nn.Identity()


__all__ = ["MonaiViTAdapter", "build_monai_vit"]
