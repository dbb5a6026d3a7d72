"""Attention map: the last block's CLS-query attention over patch tokens, mean over heads (Eq. 1).

Class-agnostic by design: the same map for every target. Recomputed from the last block's ``q``
and ``k`` for the CLS query (by the family adapter), so fused attention stays on for the rest of the model.
"""

from __future__ import annotations

import torch

from lidc_cdam.explain.api import register
from lidc_cdam.explain.attribution import Attribution
from lidc_cdam.explain.targets import TargetSpec
from lidc_cdam.models.vit import ViTModel


@torch.no_grad()
def cls_attention(model: ViTModel, images: torch.Tensor) -> torch.Tensor:
    """``A_i = softmax(Q_CLS K_i^T / sqrt(d_k))`` averaged over heads, over all tokens: ``[B, N]`` (with the
    family's own q/k norms and rotary embeddings)."""
    if not model.has_class_token:
        raise ValueError(f"the attention map needs a CLS token; this {model.family} model has none")
    tokens = model.normed_tokens(model.trunk(images))
    grid = model.layout(tuple(images.shape[2:])).grid
    return model.attention_probs(tokens, grid, slice(0, 1))[:, :, 0].mean(1)


@register("attention", {}, "Attention map (Eq. 1): CLS-query attention of the last block, mean over heads",
          signed=False)
def attention_map(model: ViTModel, images: torch.Tensor, spec: TargetSpec, **options) -> Attribution:
    layout = model.layout(tuple(images.shape[2:]))
    maps = layout.patch_grid(cls_attention(model, images))[:, None].expand(-1, spec.num_targets, *layout.grid)
    return Attribution(maps.contiguous(), "attention", "tokens", tuple(images.shape[2:]), spec.names,
                       options=options)
