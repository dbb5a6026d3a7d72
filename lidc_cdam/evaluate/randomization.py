"""Model-randomisation sanity check (Adebayo et al. 2018, cascading): randomise the head, then the
last blocks one after another, and measure how similar each method's maps stay to the trained
model's (Spearman rank correlation, SSIM). A method whose maps do not change does not depend on
what the model learned there and fails the check.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from lidc_cdam.explain.api import explain
from lidc_cdam.models.vit import ViTModel

#: a method fails when its maps keep at least this Spearman correlation after randomisation
SIMILARITY_LIMIT = 0.9


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> float:
    """Mean SSIM of two 2-D maps, each min-max scaled to [0, 1] first (uniform window, as
    scikit-image's default; the window shrinks to the map for small token grids)."""

    def scaled(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        span = x.max() - x.min()
        return (x - x.min()) / span if span > 0 else torch.zeros_like(x)

    x, y = scaled(a)[None, None], scaled(b)[None, None]
    w = min(window, *a.shape[-2:])
    w -= 1 - w % 2  # odd
    mean = lambda t: F.avg_pool2d(t, w, stride=1)  # noqa: E731
    mx, my = mean(x), mean(y)
    vx, vy, cov = mean(x * x) - mx**2, mean(y * y) - my**2, mean(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def _randomize_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Replace every parameter by Gaussian noise with the parameter's own mean and std."""
    with torch.no_grad():
        for p in module.parameters():
            std = p.std() if p.numel() > 1 else p.abs().mean()
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
            p.copy_(noise * std + p.mean())


def cascading_randomization(
    model: ViTModel,
    images: torch.Tensor,
    targets: Any,
    methods: Sequence[str],
    *,
    n_blocks: int = 2,
    seed: int = 0,
    options: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Rows ``{method, stage, spearman, ssim, changed}``: stage ``"head"`` randomises the head,
    ``"block -1"`` then also the last block, and so on for ``n_blocks`` blocks (cumulative).
    Similarities are means over images and targets, computed on each method's native maps."""
    options = options or {}
    reference = {m: explain(model, images, targets, method=m, **options.get(m, {})).maps for m in methods}
    generator = torch.Generator().manual_seed(seed)
    randomized = copy.deepcopy(model)
    stages = [("head", randomized.head)] + [
        (f"block {-i}", randomized.backbone.blocks[-i]) for i in range(1, n_blocks + 1)
    ]
    rows = []
    for stage, module in stages:
        _randomize_(module, generator)
        if stage == "head":
            _randomize_(randomized.backbone.norm, generator)
        for m in methods:
            maps = explain(randomized, images, targets, method=m, **options.get(m, {})).maps
            ref = reference[m]
            pairs = [(ref[b, k], maps[b, k]) for b in range(ref.shape[0]) for k in range(ref.shape[1])]
            rho = float(np.nanmean([_spearman(a, b) for a, b in pairs]))
            rows.append({"method": m, "stage": stage, "spearman": rho,
                         "ssim": float(np.mean([ssim(a, b) for a, b in pairs])),
                         "changed": rho < SIMILARITY_LIMIT})
    return rows


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double().cpu().numpy(), b.flatten().double().cpu().numpy()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 1.0 if np.allclose(a, b) else 0.0
    return float(spearmanr(a, b).statistic)
