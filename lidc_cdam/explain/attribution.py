"""`Attribution`: the maps an explainer returns, with what is needed to read them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F


@dataclass
class Attribution:
    """Importance maps for ``B`` images and ``K`` targets.

    ``maps`` holds raw signed scores ``[B, K, h, w]``: one per patch token (``kind="tokens"``,
    prefix tokens dropped) or per pixel (``kind="pixels"``). ``target_names[b][k]`` names each
    map; ``scores`` holds the target value ``F`` explained (logit, output or similarity) ``[B, K]``.
    """

    maps: torch.Tensor
    method: str
    kind: Literal["tokens", "pixels"]
    image_size: tuple[int, int]
    target_names: list[list[str]]
    scores: torch.Tensor | None = None
    options: dict[str, Any] = field(default_factory=dict)
    #: the images' latents ``l`` ``[B, D]`` (CLS' for token pooling) where the method computed them (CDAM)
    latents: torch.Tensor | None = None

    @property
    def num_targets(self) -> int:
        return int(self.maps.shape[1])

    def upsample(self, mode: Literal["nearest", "bilinear"] = "nearest") -> torch.Tensor:
        """Maps at image resolution ``[B, K, H, W]``.

        ``nearest`` repeats each patch score over its patch (the authors' choice, used for
        evaluation); ``bilinear`` is for display only.
        """
        if self.kind == "pixels" or tuple(self.maps.shape[-2:]) == tuple(self.image_size):
            return self.maps
        if mode == "nearest":
            gh, gw = self.maps.shape[-2:]
            h, w = self.image_size
            if h % gh == 0 and w % gw == 0:
                return self.maps.repeat_interleave(h // gh, -2).repeat_interleave(w // gw, -1)
            return F.interpolate(self.maps, size=self.image_size, mode="nearest")
        return F.interpolate(self.maps, size=self.image_size, mode=mode, align_corners=False)

    def to_numpy(self) -> dict[str, Any]:
        """Arrays and labels for saving (``np.savez``)."""
        out: dict[str, Any] = {"maps": self.maps.detach().cpu().numpy(), "kind": self.kind, "method": self.method}
        if self.scores is not None:
            out["scores"] = self.scores.detach().cpu().numpy()
        return out
