"""timm ``VisionTransformer`` (ViT, DeiT, DINO, DINOv2 with registers): pre-norm ``Block`` with timm ``Attention``."""

from __future__ import annotations

from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn, global_pool_nlc
from torch import nn

from lidc_cdam.models.backbones.base import BackboneAdapter, QKVAttention, split_heads


class TimmPatchEmbedLayout:
    """Layout of timm models with a ``PatchEmbed`` (``patch_embed``): fixed or dynamic image size; the widths and
    prefix tokens timm's ``VisionTransformer`` and ``Eva`` both record."""

    backbone: nn.Module
    size_hint = "resize the images or build the timm model with dynamic_img_size=True"

    @property
    def embed_dim(self) -> int:
        return int(self.backbone.embed_dim)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.backbone.num_prefix_tokens)

    @property
    def num_heads(self) -> int:
        return int(self.last_block.attn.num_heads)

    @property
    def in_chans(self) -> int:
        return int(self.backbone.patch_embed.proj.in_channels)

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(self.backbone.patch_embed.patch_size)

    @property
    def default_image_size(self) -> tuple[int, ...]:
        return tuple(self.backbone.patch_embed.img_size)

    @property
    def strict_image_size(self) -> bool:
        return bool(self.backbone.patch_embed.strict_img_size)

    @property
    def pads_images(self) -> bool:
        return bool(self.backbone.patch_embed.dynamic_img_pad)

    def grid(self, image_size: tuple[int, ...]) -> tuple[int, ...]:
        pe = self.backbone.patch_embed
        return tuple(pe.grid_size) if pe.strict_img_size else tuple(pe.dynamic_feat_size(tuple(image_size)))

    @property
    def depth(self) -> int:
        return len(self.backbone.blocks)

    @property
    def last_block(self) -> nn.Module:
        return self.backbone.blocks[-1]

    @property
    def norm1(self) -> nn.Module:
        return self.backbone.blocks[-1].norm1

    @property
    def head(self) -> nn.Module:
        return self.backbone.head

    def remove_head(self) -> None:
        self.backbone.reset_classifier(0)


def pool_rows(z: torch.Tensor, pool_type: str, attn_pool: nn.Module | None) -> torch.Tensor:
    """Pool the rows ``[..., Q, D]`` that the model's pooling reads (as chosen by ``pooled_rows``)."""
    if attn_pool is not None:
        lead = z.shape[:-2]
        return attn_pool(z.reshape(-1, *z.shape[-2:])).reshape(*lead, -1)
    if pool_type == "token":
        return z[..., 0, :]
    lead = z.shape[:-2]
    return global_pool_nlc(z.reshape(-1, *z.shape[-2:]), pool_type=pool_type, num_prefix_tokens=0).reshape(*lead, -1)


def attention_parts(attn: nn.Module, tokens: torch.Tensor, query: slice | None = None):
    """Attention probabilities ``[B, H, n_q, N]`` and values ``[B, H, N, e]`` of a timm ``Attention``
    on normed tokens ``[B, N, D]``, as timm's unfused path computes them; ``query`` restricts the
    query rows (e.g. ``slice(0, 1)`` for CLS)."""
    B, N, _ = tokens.shape
    H, e = attn.num_heads, attn.head_dim
    qkv = attn.qkv(tokens).reshape(B, N, 3, H, e).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    if query is not None:
        q = q[:, :, query]
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return attn.attn_drop(probs), v


class TimmViTAdapter(TimmPatchEmbedLayout, BackboneAdapter):
    """timm ``VisionTransformer``: CLS, average or attention pooling, registers, layer scale, dynamic size."""

    family = "timm VisionTransformer"
    module_type = VisionTransformer

    @classmethod
    def check(cls, backbone: nn.Module) -> None:
        last = backbone.blocks[-1]
        needed = ("norm1", "attn", "ls1", "norm2", "mlp", "ls2")
        missing = [name for name in needed if not hasattr(last, name)]
        if missing or not hasattr(last.attn, "qkv") or last.attn.qkv is None:
            raise TypeError(
                f"The last block ({type(last).__name__}) is not a pre-norm timm Block with a fused qkv "
                f"projection (missing: {missing or ['attn.qkv']}); CDAM needs the tokens entering its attention."
            )

    @classmethod
    def filter_state_dict(cls, state_dict: dict[str, Any], backbone: nn.Module) -> dict[str, Any]:
        return checkpoint_filter_fn(dict(state_dict), backbone)

    @property
    def has_class_token(self) -> bool:
        return bool(self.backbone.has_class_token)

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        x = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(images))))
        for block in bb.blocks[:-1]:
            x = block(x)
        return x

    def block(self, resid: torch.Tensor, tokens: torch.Tensor, grid: tuple[int, ...] | None) -> torch.Tensor:
        blk = self.last_block
        y = resid + blk.drop_path1(blk.ls1(blk.attn(tokens)))
        return y + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(y))))

    def final_norm(self, y: torch.Tensor) -> torch.Tensor:
        return self.backbone.norm(y)

    def pool(self, z: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        return bb.head_drop(bb.fc_norm(bb.pool(z)))

    def pooled_rows(self, num_tokens: int) -> slice:
        bb = self.backbone
        if bb.attn_pool is None and bb.global_pool == "token":
            return slice(0, 1)
        return slice(0, None) if getattr(bb, "pool_include_prefix", False) else slice(self.num_prefix_tokens, None)

    def qkv_attention(self, grid: tuple[int, ...] | None) -> QKVAttention | None:
        attn = self.last_block.attn
        plain_qk = isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)
        if not plain_qk or getattr(attn, "gate", None) is not None:
            return None
        weight = attn.qkv.weight
        bias = attn.qkv.bias if attn.qkv.bias is not None else weight.new_zeros(weight.shape[0])
        return QKVAttention(weight, bias, attn.num_heads, attn.head_dim, attn.scale)

    def finish(self, resid_rows: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        blk, bb = self.last_block, self.backbone
        y = resid_rows + blk.drop_path1(blk.ls1(blk.attn.proj(blk.attn.norm(heads))))
        y = y + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(y))))
        pool_type = "token" if self.pooled_rows(0) == slice(0, 1) else bb.global_pool
        return bb.head_drop(bb.fc_norm(pool_rows(bb.norm(y), pool_type, bb.attn_pool)))

    def attention_probs(self, tokens: torch.Tensor, grid: tuple[int, ...] | None, query: slice) -> torch.Tensor:
        return attention_parts(self.last_block.attn, tokens, query)[0]


__all__ = ["TimmPatchEmbedLayout", "TimmViTAdapter", "attention_parts", "pool_rows", "split_heads"]
