"""Attention map: the last block's CLS-query attention over patch tokens, mean over heads (Eq. 1).

Class-agnostic by design: the same map for every target. Recomputed from the last block's ``q``
and ``k`` for the CLS query, so fused attention stays on for the rest of the model.
"""

from __future__ import annotations

import torch

from lidc_cdam.explain.api import register
from lidc_cdam.explain.attribution import Attribution
from lidc_cdam.explain.targets import TargetSpec
from lidc_cdam.models.vit import ViTModel


@torch.no_grad()
def cls_attention(model: ViTModel, images: torch.Tensor) -> torch.Tensor:
    """``A_i = softmax(Q_CLS K_i^T / sqrt(d_k))`` averaged over heads, over all tokens: ``[B, N]``."""
    if not model.backbone.has_class_token:
        raise ValueError("the attention map needs a CLS token; this model has none")
    attn = model.last_block.attn
    tokens = model.normed_tokens(model.trunk(images))
    B, N, _ = tokens.shape
    H, e = attn.num_heads, attn.head_dim
    qkv = attn.qkv(tokens).reshape(B, N, 3, H, e)
    q = attn.q_norm(qkv[:, :1, 0].transpose(1, 2))  # [B, H, 1, e]
    k = attn.k_norm(qkv[:, :, 1].transpose(1, 2))  # [B, H, N, e]
    probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)  # [B, H, 1, N]
    return probs[:, :, 0].mean(1)


@register("attention", {}, "Attention map (Eq. 1): CLS-query attention of the last block, mean over heads",
          signed=False)
def attention_map(model: ViTModel, images: torch.Tensor, spec: TargetSpec, **options) -> Attribution:
    layout = model.layout(tuple(images.shape[-2:]))
    maps = layout.patch_grid(cls_attention(model, images))[:, None].expand(-1, spec.num_targets, -1, -1)
    return Attribution(maps.contiguous(), "attention", "tokens", tuple(images.shape[-2:]), spec.names,
                       options=options)
