"""Pixel-gradient baselines (docs/method.md, "Baselines"): Input x Grad, SmoothGrad, IntGrad.

All return pixel maps ``[B, K, H, W]``: the signed attribution averaged over colour channels.
Samples (noise draws, path points) of an image are batched through the model, chunked to a
memory budget; each chunk runs one forward pass and one backward pass per target.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from lidc_cdam.device import memory_budget
from lidc_cdam.explain.api import register
from lidc_cdam.explain.attribution import Attribution
from lidc_cdam.explain.targets import TargetSpec
from lidc_cdam.models.vit import ViTModel

#: default memory budget for the activations kept for backward passes (bytes)
DEFAULT_CHUNK_BYTES = 1024 * 2**20


def activation_bytes_per_image(model: ViTModel, image_hw: tuple[int, ...], dtype: torch.dtype) -> int:
    """Rough size of what one image's forward pass keeps for backward (tokens and attention)."""
    layout = model.layout(image_hw)
    n, d = layout.num_tokens, model.embed_dim
    per_block = n * d * 12 + 2 * model.num_heads * n * n
    return model.depth * per_block * torch.finfo(dtype).bits // 8


def input_gradients(model: ViTModel, inputs: torch.Tensor, spec: TargetSpec) -> torch.Tensor:
    """``dF_k / dx`` for inputs ``[B, m, C, *spatial]`` (m samples per image): ``[B, K, m, C, *spatial]``.

    One forward pass for all ``B * m`` inputs; one backward pass per target (graph kept between).
    """
    B, m = inputs.shape[:2]
    x = inputs.flatten(0, 1).detach().requires_grad_(True)
    latent = model.latent(x).view(B, 1, m, -1).expand(B, spec.num_targets, m, -1)
    objective = spec.objective(model, latent)  # [B, K, m]
    grads = []
    for k in range(spec.num_targets):
        (g,) = torch.autograd.grad(objective[:, k].sum(), x, retain_graph=k < spec.num_targets - 1)
        grads.append(g.view(inputs.shape))
    return torch.stack(grads, dim=1)


def _sample_chunks(count: int, size: int) -> Iterator[slice]:
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


def mean_sample_gradients(
    model: ViTModel,
    images: torch.Tensor,
    spec: TargetSpec,
    samples: Callable[[slice, slice], torch.Tensor],
    count: int,
    chunk_bytes: int,
) -> torch.Tensor:
    """Mean over ``count`` samples of ``dF/dx``, ``[B, K, C, H, W]``; ``samples(rows, sl)`` returns
    the samples ``sl`` of the images ``rows``, ``[len(rows), len(sl), C, H, W]``."""
    per_image = activation_bytes_per_image(model, tuple(images.shape[2:]), images.dtype)
    budget = max(1, chunk_bytes // per_image)  # images (samples) per forward pass
    total = torch.zeros(images.shape[0], spec.num_targets, *images.shape[1:], dtype=images.dtype, device=images.device)
    group = max(1, min(images.shape[0], budget // max(count, 1)))
    for start in range(0, images.shape[0], group):
        rows = slice(start, min(start + group, images.shape[0]))
        sub = spec.subset(rows)
        per_chunk = max(1, budget // (rows.stop - rows.start))
        for sl in _sample_chunks(count, per_chunk):
            total[rows] += input_gradients(model, samples(rows, sl), sub).sum(dim=2)
    return total / count


def _budget(images: torch.Tensor, options: dict) -> int:
    """``chunk_bytes`` if given, else :data:`DEFAULT_CHUNK_BYTES` (CPU), a share of the free GPU memory (CUDA)."""
    return options.get("chunk_bytes") or memory_budget(images.device, DEFAULT_CHUNK_BYTES)


def _pixel_attribution(maps: torch.Tensor, method: str, images: torch.Tensor, spec: TargetSpec, options) -> Attribution:
    return Attribution(maps.detach(), method, "pixels", tuple(images.shape[2:]), spec.names, options=options)


@register("input-x-grad", {}, "Input x Gradient: x . dF/dx, mean over colour channels")
def input_x_grad(model: ViTModel, images: torch.Tensor, spec: TargetSpec, **options) -> Attribution:
    grads = mean_sample_gradients(model, images, spec, lambda rows, sl: images[rows, None], 1,
                                  _budget(images, options))
    return _pixel_attribution((images[:, None] * grads).mean(dim=2), "input-x-grad", images, spec, options)


@register(
    "smoothgrad",
    {"n": 50, "sigma": 0.15, "seed": None},
    "SmoothGrad: mean gradient over n noisy copies (std = sigma x the image's range), mean over channels",
)
def smoothgrad(model: ViTModel, images: torch.Tensor, spec: TargetSpec, *, n: int, sigma: float, seed: int | None,
               **options) -> Attribution:
    """Noise for all ``n`` draws of an image is drawn at once, image by image, from ``seed`` (or
    torch's global generator when ``seed`` is None), so results do not depend on chunking."""
    if n < 1 or not sigma >= 0:
        raise ValueError(f"smoothgrad needs n >= 1 and sigma >= 0, got n={n}, sigma={sigma}")
    generator = torch.Generator(device=images.device).manual_seed(seed) if seed is not None else None
    dims = tuple(range(1, images.ndim))
    spread = (images.amax(dim=dims) - images.amin(dim=dims)).view(-1, 1, *([1] * len(dims)))
    noise = torch.stack([torch.randn((n, *images.shape[1:]), generator=generator, dtype=images.dtype,
                                     device=images.device) for _ in range(images.shape[0])])
    noise.mul_(sigma * spread)

    def samples(rows: slice, sl: slice) -> torch.Tensor:
        return images[rows, None] + noise[rows, sl]

    grads = mean_sample_gradients(model, images, spec, samples, n, _budget(images, options))
    return _pixel_attribution(grads.mean(dim=2), "smoothgrad", images, spec, {"n": n, "sigma": sigma, "seed": seed,
                                                                             **options})


@register("intgrad", {"n": 50}, "Integrated Gradients: zero baseline, n right-Riemann steps, mean over channels")
def intgrad(model: ViTModel, images: torch.Tensor, spec: TargetSpec, *, n: int, **options) -> Attribution:
    if n < 1:
        raise ValueError(f"intgrad needs n >= 1 steps, got {n}")
    alphas = torch.arange(1, n + 1, dtype=images.dtype, device=images.device) / n

    def samples(rows: slice, sl: slice) -> torch.Tensor:
        return alphas[sl].view(1, -1, *([1] * (images.ndim - 1))) * images[rows, None]

    grads = mean_sample_gradients(model, images, spec, samples, n, _budget(images, options))
    return _pixel_attribution((images[:, None] * grads).mean(dim=2), "intgrad", images, spec, {"n": n, **options})
