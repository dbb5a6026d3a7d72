"""`Attribution`: the maps an explainer returns, with what is needed to read them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F


@dataclass
class Attribution:
    """Importance maps for ``B`` images and ``K`` targets.

    ``maps`` holds raw signed scores ``[B, K, h, w]`` (``[B, K, d, h, w]`` for a 3D model): one per patch token
    (``kind="tokens"``, prefix tokens dropped) or per pixel / voxel (``kind="pixels"``). ``target_names[b][k]``
    names each map; ``scores`` holds the target value ``F`` explained (logit, output or similarity) ``[B, K]``.
    """

    maps: torch.Tensor
    method: str
    kind: Literal["tokens", "pixels"]
    image_size: tuple[int, ...]
    target_names: list[list[str]]
    scores: torch.Tensor | None = None
    options: dict[str, Any] = field(default_factory=dict)
    #: the images' latents ``l`` ``[B, D]`` (CLS' for token pooling) where the method computed them (CDAM)
    latents: torch.Tensor | None = None

    @property
    def num_targets(self) -> int:
        return int(self.maps.shape[1])

    def upsample(self, mode: Literal["nearest", "bilinear", "trilinear"] = "nearest") -> torch.Tensor:
        """Maps at image resolution ``[B, K, H, W]`` (``[B, K, D, H, W]`` for a 3D model).

        ``nearest`` repeats each patch score over its patch (the authors' choice, used for
        evaluation); ``bilinear`` (2D) or ``trilinear`` (3D) is for display only (either name works for both).
        """
        size = tuple(self.image_size)
        grid = tuple(self.maps.shape[2:])
        if self.kind == "pixels" or grid == size:
            return self.maps
        if mode == "nearest":
            if all(s % g == 0 for s, g in zip(size, grid, strict=True)):
                out = self.maps
                for axis, (s, g) in enumerate(zip(size, grid, strict=True), start=2):
                    out = out.repeat_interleave(s // g, axis)
                return out
            return F.interpolate(self.maps, size=size, mode="nearest")
        if mode not in ("bilinear", "trilinear"):
            raise ValueError(f"upsample mode must be 'nearest', 'bilinear' or 'trilinear', got {mode!r}")
        smooth = "bilinear" if len(size) == 2 else "trilinear"
        return F.interpolate(self.maps, size=size, mode=smooth, align_corners=False)

    def to_numpy(self) -> dict[str, Any]:
        """Arrays and labels for saving (``np.savez``)."""
        out: dict[str, Any] = {"maps": self.maps.detach().cpu().numpy(), "kind": self.kind, "method": self.method}
        if self.scores is not None:
            out["scores"] = self.scores.detach().cpu().numpy()
        return out
