"""Ground truth for per-target maps (issue 22): does each target's map point at that target's own rendered cause?

Phantom crops (:mod:`lidc_cdam.data.lidc.phantom_causes`) carry each biomarker's cause region ``C_t`` (core,
boundary band, interior, spikes, surround or the whole nodule). On the central plane, nearest-resized to the
model's input size like the consensus mask (:func:`cause_model_regions`), for a map ``S`` of target ``t``:

* ``share_cause``: :func:`~lidc_cdam.evaluate.localisation.positive_share_in_mask` of ``S`` in ``C_t`` (the share
  of the map's positive evidence in the own cause region; 0 for a map without positive values);
* ``uniform_cause``: ``|C_t| / |plane|``, what a uniform map gives;
* ``pointing_cause``: :func:`~lidc_cdam.evaluate.localisation.pointing_game` on ``C_t`` (1.0 / 0.0);
* ``share_other``: the positive share in the *other targets' region* ``O_t = (U_{t' != t} C_t') \\ C_t``, the union
  of every other target's cause region the crop carries (all eight biomarkers, whichever targets the model has),
  with the own region's pixels taken out: a pixel of ``C_t`` never counts against ``t``. Targets that share a
  region by construction (margin and lobulation: the boundary band; sphericity and diameter: the whole nodule)
  therefore cannot be told apart from each other here; their other region is what remains outside it.
  An empty ``O_t`` gives 0;
* ``uniform_other``: ``|O_t| / |plane|``;
* ``discrimination = share_cause - share_other`` and ``uniform_discrimination = uniform_cause - uniform_other``
  (the uniform map's value, the baseline a map should beat);
* ``abs_share_cause``, ``abs_share_other`` and ``abs_discrimination``: the same with the evidence of either sign,
  :func:`~lidc_cdam.evaluate.localisation.absolute_share_in_mask` of ``|S|``. A cause that *lowers* the rating (a
  calcified core: calcification 6 is "absent"; a blurred edge: margin 1 is "poorly defined") draws negative
  evidence, which the positive share cannot credit; the uniform map's values are the same as above;
* ``cause_pixels``: ``|C_t|`` at the model's input size.

A target whose region is empty on the nodule's plane (no spikes at spiculation 1, no core at calcification 6,
a region off the central slice) has no ground truth there: its ``cause_pixels`` is 0 and the other columns are
NaN, so the summaries (:mod:`.cause_report`) leave it out and count it. Targets without a cause region in the crop
(``malignant``, concepts, every target on CT crops) get NaN throughout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lidc_cdam.evaluate.localisation import absolute_share_in_mask, pointing_game, positive_share_in_mask

CAUSE_COLUMNS = ("share_cause", "uniform_cause", "pointing_cause", "share_other", "uniform_other", "discrimination",
                 "uniform_discrimination", "abs_share_cause", "abs_share_other", "abs_discrimination", "cause_pixels")


def cause_model_regions(causes: dict[str, np.ndarray], size: int) -> dict[str, torch.Tensor]:
    """Each target's cause region ``[n, size, size]`` (bool) from its 1 mm planes ``[n, h, w]``, nearest-resized
    like :func:`~lidc_cdam.evaluate.cohort_compute.model_regions` resizes the consensus mask."""
    return {t: F.interpolate(torch.from_numpy(np.asarray(r, dtype=bool))[:, None].float(), size=(size, size),
                             mode="nearest")[:, 0] > 0.5 for t, r in causes.items()}


def other_regions(regions: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per target: the union of every other target's region minus its own (``O_t`` of the module docstring)."""
    out = {}
    for t, own in regions.items():
        union = torch.zeros_like(own)
        for other, region in regions.items():
            if other != t:
                union |= region
        out[t] = union & ~own
    return out


def _empty(pixels: float) -> dict[str, float]:
    return {**{c: math.nan for c in CAUSE_COLUMNS}, "cause_pixels": pixels}


def cause_columns(maps: torch.Tensor, target_names: Sequence[str], regions: dict[str, torch.Tensor],
                  others: dict[str, torch.Tensor] | None = None) -> list[dict[str, float]]:
    """The cause columns of one nodule's maps ``[K, H, W]`` (target ``k`` named ``target_names[k]``), with its
    regions ``{target: [H, W]}`` (and their :func:`other_regions`); one dict per target, all NaN for a target
    without a region, NaN but ``cause_pixels`` = 0 for an empty one."""
    others = other_regions(regions) if others is None else others
    rows = []
    for k, name in enumerate(target_names):
        if name not in regions:
            rows.append(_empty(math.nan))
            continue
        own, other = regions[name].to(maps.device), others[name].to(maps.device)
        pixels = int(own.sum().item())
        if pixels == 0:
            rows.append(_empty(0.0))
            continue
        pair = torch.stack([own, other])
        share = positive_share_in_mask(maps[k][None].expand(2, -1, -1), pair).tolist()
        either = absolute_share_in_mask(maps[k][None].expand(2, -1, -1), pair).tolist()
        uniform = pair.float().mean((-2, -1)).tolist()
        rows.append({"share_cause": share[0], "uniform_cause": uniform[0],
                     "pointing_cause": float(pointing_game(maps[k], own).item()),
                     "share_other": share[1], "uniform_other": uniform[1], "discrimination": share[0] - share[1],
                     "uniform_discrimination": uniform[0] - uniform[1], "abs_share_cause": either[0],
                     "abs_share_other": either[1], "abs_discrimination": either[0] - either[1],
                     "cause_pixels": float(pixels)})
    return rows
