"""Localisation against known object masks (the multi-digit benchmark has them).

* :func:`positive_share_in_mask`: the share of a map's positive importance inside the target
  object's mask; :func:`absolute_share_in_mask`: the same for the importance of either sign.
* :func:`pointing_game`: a hit when the map's maximum falls on the mask (with patch maps the
  maximum is a whole patch: a hit when any of its pixels is on the mask).
* :func:`ring_regions`: a mask, the ring of a given width around it and the rest (LIDC nodules: the
  consensus mask, a 3 mm ring, the background), for :func:`positive_share_in_mask` per region.
"""

from __future__ import annotations

import torch


def _share_in_mask(weights: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``sum(W * mask) / sum(W)`` over the last two dims of non-negative ``weights``; 0 where they sum to 0."""
    weights = weights.flatten(-2)
    inside = (weights * masks.flatten(-2).to(weights.dtype)).sum(-1)
    total = weights.sum(-1)
    return torch.where(total > 0, inside / total.clamp(min=torch.finfo(weights.dtype).tiny), 0.0)


def positive_share_in_mask(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``sum(relu(S) * mask) / sum(relu(S))`` over the last two dims; 0 for maps without positive values."""
    return _share_in_mask(maps.clamp(min=0), masks)


def absolute_share_in_mask(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``sum(|S| * mask) / sum(|S|)`` over the last two dims: the share of the map's evidence of either sign;
    0 for an all-zero map."""
    return _share_in_mask(maps.abs(), masks)


def pointing_game(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Bool per map: does a pixel holding the map's maximum lie on the mask?"""
    flat = maps.flatten(-2)
    at_max = flat == flat.amax(-1, keepdim=True)
    return (at_max & masks.flatten(-2).bool()).any(-1)


def ring_regions(mask: torch.Tensor, ring: float, spacing: float = 1.0) -> dict[str, torch.Tensor]:
    """``{"mask", "ring", "background"}`` bool ``[..., h, w]``: the mask, the pixels outside it within
    ``ring`` (same unit as ``spacing``, the pixel size) of it by Euclidean distance, and the rest.
    The three partition the plane; a mask without pixels has an empty ring."""
    from scipy.ndimage import distance_transform_edt

    inside = mask.bool()
    flat = inside.reshape(-1, *inside.shape[-2:]).cpu().numpy()
    near = torch.zeros(flat.shape, dtype=torch.bool)
    for i, plane in enumerate(flat):
        if plane.any():
            distance = distance_transform_edt(~plane, sampling=spacing)
            near[i] = torch.from_numpy((distance > 0) & (distance <= ring))
    near = near.view(inside.shape).to(inside.device)
    return {"mask": inside, "ring": near, "background": ~(inside | near)}
