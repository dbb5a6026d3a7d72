"""Perturbation metrics with a Gaussian-blur baseline (paper section 3.4, SPEC "Evaluation").

* :func:`gaussian_blur`: sigma = 14 px, kernel truncated at 4 sigma, reflect padding (PyTorch's
  convention: the edge pixel is not repeated), separable, all channels.
* :func:`perturbation_curves`: MIF / LIF curves: pixels ranked by their signed score (MIF
  descending, LIF ascending; ties by a stable sort on the pixel index), the first
  ``floor(p * H * W / 100)`` replaced by the blurred image for p = 0, 5, ..., 95 %, the raw target
  output recorded; all levels of an image in one batch.
* :func:`box_sensitivity`: Pearson correlation over random boxes between the sum of importance in
  a box and the output change when the box is blurred (``f_box(s)``).
* :func:`compactness`: share of scores with ``|S| <= 0.05 * max(S)``.
Areas are trapezoids (:func:`trapezoid`): over p in percent for MIF / LIF, over s in patch units
for boxes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

#: perturbation levels in percent of the pixels (SPEC: 0, 5, ..., 95)
PERCENTS: tuple[int, ...] = tuple(range(0, 100, 5))

ScoreFn = Callable[[torch.Tensor], torch.Tensor]  # images [n, C, H, W] -> outputs [n, n_outputs]


def gaussian_blur(images: torch.Tensor, sigma: float = 14.0, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` images, reflect padding, radius ``truncate * sigma``.

    The radius is capped at ``size - 1`` for images smaller than the kernel (reflect padding cannot
    be wider than the image); at 224 px the kernel is the SPEC's 113 taps.
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


def sample_boxes(
    image_hw: tuple[int, int], patch: int, sizes: Sequence[int], n_boxes: int, generator: torch.Generator
) -> torch.Tensor:
    """Top-left corners ``[S, n_boxes, 2]`` (y, x) of boxes of side ``s * patch`` fully inside the
    image, uniform over integer positions, drawn with replacement."""
    H, W = image_hw
    corners = []
    for s in sizes:
        side = s * patch
        if side > min(H, W):
            raise ValueError(f"box side {side} px does not fit a {H}x{W} image")
        ys = torch.randint(0, H - side + 1, (n_boxes,), generator=generator)
        xs = torch.randint(0, W - side + 1, (n_boxes,), generator=generator)
        corners.append(torch.stack([ys, xs], dim=1))
    return torch.stack(corners)


def box_masks(corners: torch.Tensor, sizes: Sequence[int], patch: int, image_hw: tuple[int, int]) -> torch.Tensor:
    """``[S, n, H, W]`` bool masks of the boxes from :func:`sample_boxes`."""
    H, W = image_hw
    yy = torch.arange(H).view(1, 1, H, 1)
    xx = torch.arange(W).view(1, 1, 1, W)
    side = (torch.as_tensor(list(sizes)) * patch).view(-1, 1, 1, 1)
    y0 = corners[..., 0].view(*corners.shape[:2], 1, 1)
    x0 = corners[..., 1].view(*corners.shape[:2], 1, 1)
    return (yy >= y0) & (yy < y0 + side) & (xx >= x0) & (xx < x0 + side)


def box_output_changes(
    score_fn: ScoreFn, image: torch.Tensor, blurred: torch.Tensor, masks: torch.Tensor, record: int,
    batch_size: int = 64,
) -> torch.Tensor:
    """``f(x) - f(x with the box blurred)`` for masks ``[S, n, H, W]``: ``[S, n]``. Independent of
    any map, so computed once per image and recorded output and shared by all methods."""
    flat = masks.flatten(0, 1)[:, None]
    outputs = [score_fn(torch.where(chunk, blurred[None], image[None]))[:, record] for chunk in flat.split(batch_size)]
    original = score_fn(image[None])[0, record]
    return (original - torch.cat(outputs)).view(masks.shape[:2])


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation along the last dimension; 0 where either side is constant."""
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    denom = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(denom > 0, (a * b).sum(-1) / denom.clamp(min=torch.finfo(a.dtype).tiny), 0.0)


def box_sensitivity(maps: torch.Tensor, masks: torch.Tensor, changes: torch.Tensor) -> torch.Tensor:
    """``f_box(s)`` ``[K, S]``: correlation over boxes of the summed importance ``[K, S, n]`` with the
    output changes ``[S, n]``."""
    sums = torch.einsum("khw,snhw->ksn", maps, masks.to(maps.dtype))
    return pearson(sums, changes.to(maps.dtype).expand_as(sums))


def compactness(maps: torch.Tensor, threshold: float = 0.05) -> torch.Tensor:
    """Share of scores with ``|S| <= threshold * max(S)`` per map (max of the signed scores), over
    the last two dimensions."""
    flat = maps.flatten(-2)
    limit = threshold * flat.amax(-1, keepdim=True)
    return (flat.abs() <= limit).to(maps.dtype).mean(-1)
