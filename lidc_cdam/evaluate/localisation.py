"""Localisation against known object masks (the multi-digit benchmark has them).

* :func:`positive_share_in_mask`: the share of a map's positive importance inside the target
  object's mask.
* :func:`pointing_game`: a hit when the map's maximum falls on the mask (with patch maps the
  maximum is a whole patch: a hit when any of its pixels is on the mask).
* :func:`ring_regions`: a mask, the ring of a given width around it and the rest (LIDC nodules: the
  consensus mask, a 3 mm ring, the background), for :func:`positive_share_in_mask` per region.
"""

from __future__ import annotations

import torch


def positive_share_in_mask(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``sum(relu(S) * mask) / sum(relu(S))`` over the last two dims; 0 for maps without positive values."""
    positive = maps.clamp(min=0).flatten(-2)
    inside = (positive * masks.flatten(-2).to(positive.dtype)).sum(-1)
    total = positive.sum(-1)
    return torch.where(total > 0, inside / total.clamp(min=torch.finfo(positive.dtype).tiny), 0.0)


def absolute_share_in_mask(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``sum(|S| * mask) / sum(|S|)`` over the last two dims: the share of the map's evidence of either sign;
    0 for an all-zero map."""
    magnitude = maps.abs().flatten(-2)
    inside = (magnitude * masks.flatten(-2).to(magnitude.dtype)).sum(-1)
    total = magnitude.sum(-1)
    return torch.where(total > 0, inside / total.clamp(min=torch.finfo(magnitude.dtype).tiny), 0.0)


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
