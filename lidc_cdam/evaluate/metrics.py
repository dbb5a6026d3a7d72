"""All metrics of one image for several methods, sharing the map-independent forward passes.

For an image with recorded output ``c1`` and, on multi-object images, a second class ``c2``:
fidelity ``A_LIF-MIF`` and box sensitivity ``A_box`` for the maps explaining ``c1``, the primed
variants for the maps explaining ``c2`` while still recording ``c1``, the Deltas of Eq. 7 and 8,
and compactness (paper section 3.4). The boxes' output changes do not depend on the maps and are
computed once per image (docs/method.md, "Where the speed comes from"). Every box side ``s * patch`` must be smaller
than the image (docs/method.md, "Evaluation"): a larger size is an error, not silently dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from lidc_cdam.evaluate.perturbation import (
    PERCENTS,
    ScoreFn,
    box_masks,
    box_output_changes,
    box_sensitivity,
    check_box_sizes,
    compactness,
    perturbation_curves,
    sample_boxes,
    trapezoid,
)

#: box sides in patch units (docs/method.md, "Evaluation": 1..27, i.e. 8..216 px for patch 8, all smaller than 224 px)
BOX_SIZES: tuple[int, ...] = tuple(range(1, 28))


@dataclass
class ImageMetrics:
    """Curves ``[P]`` / ``[S]`` and areas of one method on one image (primed: the other class's map)."""

    mif: torch.Tensor
    lif: torch.Tensor
    f_box: torch.Tensor
    a_mif: float  # logit x percent
    a_lif: float
    a_box: float
    compactness: float
    box_sizes: tuple[int, ...] = ()
    mif_prime: torch.Tensor | None = None
    lif_prime: torch.Tensor | None = None
    f_box_prime: torch.Tensor | None = None
    a_mif_prime: float | None = None
    a_lif_prime: float | None = None
    a_box_prime: float | None = None

    @property
    def fidelity(self) -> float:
        """``A_LIF-MIF = A_LIF - A_MIF`` (logit x percent)."""
        return self.a_lif - self.a_mif

    @property
    def fidelity_prime(self) -> float | None:
        """``A_LIF'-MIF'``: ranking by the other class's map, recording the first class."""
        return None if self.a_mif_prime is None else self.a_lif_prime - self.a_mif_prime

    @property
    def delta_fidelity(self) -> float | None:
        """Eq. 7 integrated: ``A_LIF-MIF - A_LIF'-MIF'``."""
        return None if self.fidelity_prime is None else self.fidelity - self.fidelity_prime

    @property
    def delta_box(self) -> float | None:
        """Eq. 8 integrated: ``A_box - A_box'``."""
        return None if self.a_box_prime is None else self.a_box - self.a_box_prime


def evaluate_image(
    score_fn: ScoreFn,
    image: torch.Tensor,
    blurred: torch.Tensor,
    maps: dict[str, torch.Tensor],
    record: int,
    *,
    patch: int,
    native_maps: dict[str, torch.Tensor] | None = None,
    batch_size: int = 64,
    **options: Any,
) -> dict[str, ImageMetrics]:
    """Metrics per method for one image ``[C, H, W]``: :func:`evaluate_targets` with one recorded output.

    ``maps[method]`` is ``[H, W]`` (explaining ``record``) or ``[2, H, W]`` (explaining ``record``
    and a second class, for the primed metrics: both maps record ``record``, so one set of box forwards serves
    them), at pixel resolution. ``native_maps`` gives the maps at the method's own resolution for compactness
    (default: ``maps``). ``options``: ``box_sizes``, ``n_boxes``, ``generator``, ``percents`` as for
    :func:`evaluate_targets`.

    Raises ``ValueError`` before any forward pass when a box side ``s * patch`` is not smaller
    than ``min(H, W)`` (such a box would cover the image).
    """
    maps = {m: v[None] if v.ndim == 2 else v for m, v in maps.items()}
    counts = {v.shape[0] for v in maps.values()}
    if len(counts) > 1:
        raise ValueError(f"every method needs the same number of maps (1, or 2 for the primed metrics), got {counts}")
    native = {m: v[None] if v.ndim == 2 else v for m, v in (native_maps or maps).items()}
    per_map = evaluate_targets(score_fn, image, blurred, maps, [record] * counts.pop(), patch=patch,
                               native_maps=native, batch_size=batch_size, curves_by_method=True, **options)
    return {method: _with_primed(*rows) for method, rows in per_map.items()}


def _with_primed(first: ImageMetrics, primed: ImageMetrics | None = None) -> ImageMetrics:
    """The metrics of the first map, with those of the second map (the other class's) as the primed ones."""
    if primed is None:
        return first
    return replace(first, mif_prime=primed.mif, lif_prime=primed.lif, f_box_prime=primed.f_box,
                   a_mif_prime=primed.a_mif, a_lif_prime=primed.a_lif, a_box_prime=primed.a_box)


def evaluate_targets(
    score_fn: ScoreFn,
    image: torch.Tensor,
    blurred: torch.Tensor,
    maps: dict[str, torch.Tensor],
    records: Sequence[int],
    *,
    patch: int,
    native_maps: dict[str, torch.Tensor] | None = None,
    box_sizes: Sequence[int] = BOX_SIZES,
    n_boxes: int = 100,
    generator: torch.Generator | None = None,
    percents: Sequence[int] = PERCENTS,
    batch_size: int = 256,
    curves_by_method: bool = False,
) -> dict[str, list[ImageMetrics]]:
    """Metrics per method and target for one image ``[C, H, W]`` with ``K`` targets.

    ``maps[method]`` is ``[K, H, W]`` at pixel resolution, map ``k`` explaining output ``records[k]``
    of ``score_fn`` (a logit, a regression output or a concept similarity; several maps may record the same
    output). The boxes and their output changes are drawn and computed once for the image and shared by every
    method and target (one set of box forwards, one column per distinct recorded output); the MIF / LIF levels of
    all maps run in shared batches (``curves_by_method``: the batches of one method at a time, as the benchmark's
    committed results were computed). Returns ``{method: [ImageMetrics of target k]}`` (no primed values).
    """
    hw = tuple(image.shape[-2:])
    sizes = list(box_sizes)
    check_box_sizes(sizes, patch, hw)
    corners = sample_boxes(hw, patch, sizes, n_boxes, generator or torch.Generator().manual_seed(0))
    masks = box_masks(corners, sizes, patch, hw, device=image.device)
    records = [int(r) for r in records]
    distinct = list(dict.fromkeys(records))
    changes, output_scale = box_output_changes(score_fn, image, blurred, masks, distinct, batch_size,
                                               return_scale=True)  # [R, S, n], [R, S]
    if len(distinct) < len(records):
        column = torch.tensor([distinct.index(r) for r in records], device=changes.device)
        changes, output_scale = changes[column], output_scale[column]  # [K, S, n], [K, S]
    methods = list(maps)
    if curves_by_method:
        parts = [perturbation_curves(score_fn, image, blurred, maps[m], records, percents, batch_size)
                 for m in methods]
        curves = {name: torch.cat([c[name] for c in parts]) for name in ("mif", "lif")}
    else:
        stacked = torch.cat([maps[m] for m in methods])  # [M * K, H, W]
        curves = perturbation_curves(score_fn, image, blurred, stacked, records * len(methods), percents, batch_size)
    a_mif, a_lif = trapezoid(curves["mif"], percents), trapezoid(curves["lif"], percents)
    results: dict[str, list[ImageMetrics]] = {}
    K = len(records)
    for i, method in enumerate(methods):
        m = maps[method]
        f_box = box_sensitivity(m, masks, changes, output_scale=output_scale)  # [K, S]
        a_box = trapezoid(f_box, sizes) if len(sizes) > 1 else f_box[:, 0]
        native = compactness((native_maps or maps)[method])
        rows = slice(i * K, (i + 1) * K)
        results[method] = [
            ImageMetrics(mif=curves["mif"][rows][k], lif=curves["lif"][rows][k], f_box=f_box[k],
                         a_mif=a_mif[rows][k].item(), a_lif=a_lif[rows][k].item(), a_box=a_box[k].item(),
                         compactness=native[k].item(), box_sizes=tuple(sizes))
            for k in range(K)
        ]
    return results
