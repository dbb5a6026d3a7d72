"""GradCAM for ViT (docs/method.md, "Baselines"; Gildenblat's pytorch-grad-cam recipe for ViTs).

Activations: the tokens ``T = blocks[-1].norm1(X)`` entering the final attention, prefix tokens
dropped and read as a ``D x gh x gw`` feature map. Channel weights: the spatial mean of
``dF/dT``; map: ``ReLU(sum_c w_c T_c)`` per patch. The raw map is returned; min-max scaling is a
display step only.
"""

from __future__ import annotations

import torch

from lidc_cdam.explain.api import register
from lidc_cdam.explain.attribution import Attribution
from lidc_cdam.explain.cdam import normed_token_gradients
from lidc_cdam.explain.targets import TargetSpec
from lidc_cdam.models.vit import ViTModel


@register("gradcam", {}, "GradCAM for ViT at blocks[-1].norm1: ReLU(sum_c mean_patches(dF/dT_c) T_c)",
          signed=False)
def gradcam(model: ViTModel, images: torch.Tensor, spec: TargetSpec, **options) -> Attribution:
    tokens, grads = normed_token_gradients(model, images, spec)
    p = model.num_prefix_tokens
    weights = grads[:, :, p:].mean(dim=2)  # [B, K, D]
    cam = torch.einsum("bkd,bnd->bkn", weights, tokens[:, p:]).clamp(min=0)
    layout = model.layout(tuple(images.shape[2:]))
    maps = cam.reshape(*cam.shape[:2], *layout.grid)
    return Attribution(maps.detach(), "gradcam", "tokens", tuple(images.shape[2:]), spec.names, options=options)
