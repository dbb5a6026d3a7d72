"""Perturbation metrics with a Gaussian-blur baseline (paper section 3.4, docs/method.md, "Evaluation").

* :func:`gaussian_blur`: sigma = 14 px, kernel truncated at 4 sigma, reflect padding (PyTorch's
  convention: the edge pixel is not repeated), separable, all channels.
* :func:`perturbation_curves`: MIF / LIF curves: pixels ranked by their signed score (MIF
  descending, LIF ascending; ties by a stable sort on the pixel index), the first
  ``floor(p * H * W / 100)`` replaced by the blurred image for p = 0, 5, ..., 95 %, the raw target
  output recorded; all levels of an image in one batch.
* :func:`box_sensitivity`: Pearson correlation over random boxes between the sum of importance in
  a box and the output change when the box is blurred (``f_box(s)``); 0 where either side is
  constant up to round-off (:func:`pearson`). Every box side ``s * patch`` must be smaller than the
  image (:func:`check_box_sizes`): a box as large as the image makes every box sum and every output
  change one number, whose float noise would otherwise be correlated.
* :func:`compactness`: share of scores with ``|S| <= 0.05 * max(S)``.
Areas are trapezoids (:func:`trapezoid`): over p in percent for MIF / LIF, over s in patch units
for boxes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

#: perturbation levels in percent of the pixels (docs/method.md, "Evaluation": 0, 5, ..., 95)
PERCENTS: tuple[int, ...] = tuple(range(0, 100, 5))

ScoreFn = Callable[[torch.Tensor], torch.Tensor]  # images [n, C, H, W] -> outputs [n, n_outputs]


def gaussian_blur(images: torch.Tensor, sigma: float = 14.0, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` images, reflect padding, radius ``truncate * sigma``.

    The radius is capped at ``size - 1`` for images smaller than the kernel (reflect padding cannot
    be wider than the image); at 224 px the kernel is docs/method.md's 113 taps.
    """
    radius = int(truncate * sigma + 0.5)
    out = images
    for dim in (-1, -2):
        r = min(radius, images.shape[dim] - 1)
        x = torch.arange(-r, r + 1, dtype=images.dtype, device=images.device)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        kernel = kernel / kernel.sum()
        c = images.shape[1]
        if dim == -1:
            padded = F.pad(out, (r, r, 0, 0), mode="reflect")
            weight = kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
        else:
            padded = F.pad(out, (0, 0, r, r), mode="reflect")
            weight = kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1)
        out = F.conv2d(padded, weight, groups=c)
    return out


def trapezoid(values: torch.Tensor, xs: Sequence[float]) -> torch.Tensor:
    """Trapezoid area of ``values[..., len(xs)]`` over ``xs``."""
    x = torch.as_tensor(list(xs), dtype=values.dtype, device=values.device)
    return torch.trapezoid(values, x, dim=-1)


def _ranked_masks(maps: torch.Tensor, counts: torch.Tensor, descending: bool) -> torch.Tensor:
    """``[K, P, H*W]`` bool: the first ``counts[p]`` pixels of each map in rank order."""
    flat = maps.flatten(1)
    order = torch.sort(flat, dim=1, descending=descending, stable=True).indices  # [K, HW]
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(flat.shape[1], device=maps.device).expand_as(order))
    return rank[:, None, :] < counts.view(1, -1, 1)


def perturbation_curves(
    score_fn: ScoreFn,
    image: torch.Tensor,
    blurred: torch.Tensor,
    maps: torch.Tensor,
    record: Sequence[int] | torch.Tensor,
    percents: Sequence[int] = PERCENTS,
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """MIF and LIF curves of one image ``[C, H, W]`` for ``K`` pixel maps ``[K, H, W]``.

    ``record[k]`` is the output recorded while perturbing by map ``k`` (for class discrimination,
    the map may explain another class than the one recorded). Returns ``{"mif", "lif"}`` each
    ``[K, P]`` raw outputs.
    """
    K, H, W = maps.shape
    if tuple(image.shape[-2:]) != (H, W):
        raise ValueError(f"maps are {H}x{W} but the image is {tuple(image.shape[-2:])}: upsample token maps first")
    counts = torch.tensor([p * H * W // 100 for p in percents], device=maps.device)
    record = torch.as_tensor(record, device=maps.device).view(K, 1).expand(K, len(percents))
    curves = {}
    for name, descending in (("mif", True), ("lif", False)):
        masks = _ranked_masks(maps, counts, descending).view(K * len(percents), 1, H, W)
        outputs = []
        for chunk in masks.split(batch_size):
            x = torch.where(chunk, blurred[None], image[None])
            outputs.append(score_fn(x))
        out = torch.cat(outputs).view(K, len(percents), -1)
        curves[name] = out.gather(-1, record[..., None]).squeeze(-1)
    return curves


def check_box_sizes(sizes: Sequence[int], patch: int, image_hw: tuple[int, int]) -> None:
    """Raise ``ValueError`` unless every box side ``s * patch`` is at least one pixel and smaller
    than ``min(H, W)``: a box as large as the image would cover it, every box would be the same
    and its correlation meaningless (docs/method.md, "Evaluation": the largest box is smaller than the image)."""
    H, W = image_hw
    if not len(sizes):
        raise ValueError("no box sizes given")
    for s in sizes:
        side = s * patch
        if s < 1:
            raise ValueError(f"box size {s} (patch units) must be at least 1")
        if side >= min(H, W):
            raise ValueError(
                f"box size {s} (side {s} x {patch} = {side} px) would cover the {H}x{W} image: box sides must "
                f"be smaller than the image, here at most {(min(H, W) - 1) // patch} patches"
            )


def sample_boxes(
    image_hw: tuple[int, int], patch: int, sizes: Sequence[int], n_boxes: int, generator: torch.Generator
) -> torch.Tensor:
    """Top-left corners ``[S, n_boxes, 2]`` (y, x) of boxes of side ``s * patch`` fully inside the
    image, uniform over integer positions, drawn with replacement. Sides must be smaller than the
    image (:func:`check_box_sizes`)."""
    check_box_sizes(sizes, patch, image_hw)
    H, W = image_hw
    corners = []
    for s in sizes:
        side = s * patch
        ys = torch.randint(0, H - side + 1, (n_boxes,), generator=generator)
        xs = torch.randint(0, W - side + 1, (n_boxes,), generator=generator)
        corners.append(torch.stack([ys, xs], dim=1))
    return torch.stack(corners)


def box_masks(corners: torch.Tensor, sizes: Sequence[int], patch: int, image_hw: tuple[int, int],
              device: torch.device | str | None = None) -> torch.Tensor:
    """``[S, n, H, W]`` bool masks of the boxes from :func:`sample_boxes`, built on ``device`` (default: the
    corners'; the corners are drawn on the CPU, from a CPU generator, and the masks built where they are used)."""
    H, W = image_hw
    device = corners.device if device is None else torch.device(device)
    corners = corners.to(device)
    yy = torch.arange(H, device=device).view(1, 1, H, 1)
    xx = torch.arange(W, device=device).view(1, 1, 1, W)
    side = (torch.as_tensor(list(sizes), device=device) * patch).view(-1, 1, 1, 1)
    y0 = corners[..., 0].view(*corners.shape[:2], 1, 1)
    x0 = corners[..., 1].view(*corners.shape[:2], 1, 1)
    return (yy >= y0) & (yy < y0 + side) & (xx >= x0) & (xx < x0 + side)


def box_output_changes(
    score_fn: ScoreFn, image: torch.Tensor, blurred: torch.Tensor, masks: torch.Tensor,
    record: int | Sequence[int] | torch.Tensor, batch_size: int = 64, *, return_scale: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``f(x) - f(x with the box blurred)`` for masks ``[S, n, H, W]``: ``[S, n]``. Independent of
    any map, so computed once per image and recorded output and shared by all methods.

    ``record`` may list several outputs ``[R]``: the same forward passes then serve them all and the
    changes are ``[R, S, n]`` (one set of box forwards for every target of an image).

    With ``return_scale``, also the magnitude of the outputs the changes are differences of,
    ``[S]`` (``[R, S]``): ``max(|f(x)|, max_n |f(x_box)|)`` of the recorded output. A change's
    round-off is relative to that, not to the (maybe tiny) change: pass it to :func:`box_sensitivity`
    as ``output_scale``.
    """
    several = torch.as_tensor(record).ndim == 1
    columns = torch.as_tensor(record).view(-1).tolist()
    flat = masks.flatten(0, 1)[:, None]
    outputs = [score_fn(torch.where(chunk, blurred[None], image[None]))[:, columns]
               for chunk in flat.split(batch_size)]
    original = score_fn(image[None])[0, columns]  # [R]
    boxed = torch.cat(outputs).view(*masks.shape[:2], len(columns)).permute(2, 0, 1)  # [R, S, n]
    changes = original.view(-1, 1, 1) - boxed
    scale = torch.maximum(boxed.abs().amax(-1), original.abs().view(-1, 1))
    if not several:
        changes, scale = changes[0], scale[0]
    return (changes, scale) if return_scale else changes


#: a side of :func:`pearson` whose RMS spread is at most this many machine epsilons of its dtype
#: times its scale counts as constant (float32: 1.2e-4 relative, float64: 2.3e-13)
ROUNDOFF_EPS = 1024


def _is_constant(x: torch.Tensor, centered: torch.Tensor, scale, rtol: float | None) -> torch.Tensor:
    eps = torch.finfo(x.dtype if x.is_floating_point() else torch.get_default_dtype()).eps
    tol = ROUNDOFF_EPS * eps if rtol is None else rtol
    if scale is None:
        scale = x.abs().amax(-1)
    scale = torch.as_tensor(scale, dtype=centered.dtype, device=centered.device)
    spread = centered.norm(dim=-1)  # sqrt(n) x the RMS deviation from the mean
    return spread <= tol * math.sqrt(x.shape[-1]) * scale


def pearson(
    a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor | float | None = None,
    b_scale: torch.Tensor | float | None = None, *, rtol: float | None = None,
) -> torch.Tensor:
    """Pearson correlation along the last dimension; 0 where either side is constant up to round-off.

    A side ``x`` of length ``n`` counts as constant when ``||x - mean(x)|| <= rtol * sqrt(n) *
    scale``, i.e. when its RMS deviation from its mean is at most ``rtol`` times ``scale``: the
    magnitude its round-off is relative to. ``scale`` defaults to ``max |x|`` of the side; give it
    explicitly (broadcastable to ``x.shape[:-1]``) where the values are differences or sums of larger
    numbers, whose round-off is relative to those (:func:`box_sensitivity`). ``rtol`` defaults to
    ``ROUNDOFF_EPS = 1024`` machine epsilons of the side's own dtype (float32: 1.2e-4, float64:
    2.3e-13): well above the round-off of a float32 forward pass (about one epsilon of the logits'
    magnitude between batch sizes) or of summing a box of ~50 000 pixels (about ``sqrt(50 000) ~
    224`` epsilons of the summed magnitudes, typically), and below real variation: for boxes of 7/8
    of a 64 px image on a small digits ViT, the output changes spread by ~1e6 epsilons and the box
    sums by 5e4 to 1e6, the least (~7e3) for the near-uniform attention maps. The correlation itself
    is computed in the promoted dtype of the two sides.
    """
    dtype = torch.promote_types(a.dtype, b.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    ca = a.to(dtype) - a.to(dtype).mean(-1, keepdim=True)
    cb = b.to(dtype) - b.to(dtype).mean(-1, keepdim=True)
    constant = _is_constant(a, ca, a_scale, rtol) | _is_constant(b, cb, b_scale, rtol)
    denom = ca.norm(dim=-1) * cb.norm(dim=-1)
    r = (ca * cb).sum(-1) / denom.clamp(min=torch.finfo(dtype).tiny)
    return torch.where(constant | (denom <= 0), torch.zeros((), dtype=dtype, device=r.device), r)


def box_sensitivity(
    maps: torch.Tensor, masks: torch.Tensor, changes: torch.Tensor,
    output_scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """``f_box(s)`` ``[K, S]``: correlation over boxes of the summed importance ``[K, S, n]`` with the
    output changes ``[S, n]``, in the dtype of ``maps``.

    0 where either side is constant up to round-off (:func:`pearson`): a box sum's round-off is
    relative to the summed magnitudes ``sum |map|`` in the box (the largest over the boxes of a size
    is the sums' scale), an output change's to the outputs it is the difference of: pass
    ``output_scale`` (a number or ``[S]``, from :func:`box_output_changes` with
    ``return_scale=True``). Without it the changes' own ``max |change|`` is used, which does not
    catch the noise of changes that are tiny against the outputs.
    """
    weights = masks.to(maps.dtype)
    sums = torch.einsum("khw,snhw->ksn", maps, weights)
    sum_scale = torch.einsum("khw,snhw->ksn", maps.abs(), weights).amax(-1)
    changes = changes.expand_as(sums) if changes.dtype.is_floating_point else changes.to(maps.dtype).expand_as(sums)
    if output_scale is not None:
        output_scale = torch.as_tensor(output_scale, device=sums.device).expand(sums.shape[:-1])
    return pearson(sums, changes, sum_scale, output_scale).to(maps.dtype)


def compactness(maps: torch.Tensor, threshold: float = 0.05) -> torch.Tensor:
    """Share of scores with ``|S| <= threshold * max(S)`` per map (max of the signed scores), over
    the last two dimensions."""
    flat = maps.flatten(-2)
    limit = threshold * flat.amax(-1, keepdim=True)
    return (flat.abs() <= limit).to(maps.dtype).mean(-1)
