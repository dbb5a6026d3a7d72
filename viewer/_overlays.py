"""CDAM overlays as napari layers: colour maps, the crop's placement in the scan's world, layers updated in place.

An overlay is a ``[32, 32, 32]`` array on the crop's 1 mm grid shown through the crop's own affine
(:func:`crop_affine`): napari's world coordinates are patient mm, so it lands on the CT wherever the CT lies,
at no resampling cost and with memory independent of the scan's size (a 512 x 512 x 400 scan would need
420 MB per target on the scan's grid). NIfTI export resamples onto the scan's grid instead
(:func:`lidc_cdam.ct.placement.place_on_scan`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

META_KEY = "lidc_cdam"


def cdam_colormap(signed: bool = True, n: int = 256):
    """napari colormap from :func:`lidc_cdam.viz.cdam_cmap`: blue - transparent - orange (signed, for limits
    ``[-L, L]``) or transparent - orange (unsigned, ``[0, L]``)."""
    from napari.utils.colormaps import Colormap

    from lidc_cdam.viz import cdam_cmap

    t = np.linspace(0.0, 1.0, n)
    if signed:
        rgba = cdam_cmap()(t)
        strength = np.abs(2.0 * t - 1.0)
    else:
        rgba = cdam_cmap()(0.5 + 0.5 * t)
        strength = t
    rgba[:, 3] = np.clip((strength - 0.06) / 0.3, 0.0, 1.0)
    name = "cdam-signed" if signed else "cdam-positive"
    return Colormap(rgba, name=name, display_name=name)


def agreement_colormap(n: int = 256):
    """Sign agreement of the folds, for limits ``[0, 1]``: red where few folds share the mean map's sign, fading
    to transparent where all do (disagreement is what the eye should find)."""
    from napari.utils.colormaps import Colormap

    t = np.linspace(0.0, 1.0, n)
    rgba = np.zeros((n, 4))
    rgba[:, 0] = 1.0
    rgba[:, 1] = 0.15 + 0.7 * t
    rgba[:, 2] = 0.1
    rgba[:, 3] = np.clip((1.0 - t) / 0.5, 0.0, 1.0) * 0.9
    return Colormap(rgba, name="fold-agreement", display_name="fold agreement")


def crop_affine(crop: dict[str, Any]) -> np.ndarray:
    """The napari affine ``[4, 4]`` of a crop: data index (z, y, x) -> world (z, y, x) patient mm. The crop's
    ``crop_to_world`` maps (z, y, x) indices to (x, y, z) mm; napari's world is (z, y, x)."""
    to_world = np.asarray(crop["crop_to_world"], dtype=float)
    out = np.eye(4)
    out[:3, :] = to_world[[2, 1, 0], :]
    return out


def world_to_crop_index(crop: dict[str, Any], world_zyx: Iterable[float]) -> np.ndarray:
    """Continuous crop index (z, y, x) of a napari world point (z, y, x) mm."""
    affine = crop_affine(crop)
    point = np.append(np.asarray(list(world_zyx), dtype=float)[-3:], 1.0)
    return (np.linalg.inv(affine) @ point)[:3]


@dataclass
class Overlay:
    """One overlay to show: ``data`` on the crop grid, placed by ``affine``; ``limits`` its contrast limits."""

    key: str  # the target (one layer per target, updated in place)
    name: str
    data: np.ndarray
    affine: np.ndarray
    limits: tuple[float, float]
    colormap: Any
    metadata: dict[str, Any]


class OverlayLayers:
    """The overlay layers of one viewer, one per key, updated in place when they exist (much faster than adding)."""

    def __init__(self, viewer: Any):
        self.viewer = viewer
        self.layers: dict[str, Any] = {}

    def show(self, overlays: list[Overlay], opacity: float, visible: str | None = None) -> dict[str, Any]:
        """Show ``overlays``, one layer per key (the ``visible`` key's layer alone visible; default the first).
        Existing layers are updated in place, setting only what changed (each napari setter redraws), hidden
        ones first so that they are not sliced in vain; layers of keys no longer shown are removed."""
        previous, self.layers = self.layers, {}
        visible = visible if visible in {ov.key for ov in overlays} else (overlays[0].key if overlays else None)
        for ov in overlays:
            layer = previous.pop(ov.key, None)
            if layer is not None and layer in self.viewer.layers:
                if layer.visible != (ov.key == visible):
                    layer.visible = ov.key == visible
                if not np.array_equal(layer.affine.affine_matrix, ov.affine):
                    layer.affine = ov.affine
                if layer.colormap.name != ov.colormap.name:
                    layer.colormap = ov.colormap
                if tuple(layer.contrast_limits) != tuple(ov.limits):
                    layer.contrast_limits_range = ov.limits
                    layer.contrast_limits = ov.limits
                if layer.name != ov.name:
                    layer.name = ov.name
                layer.metadata = ov.metadata
                layer.data = ov.data
            else:
                layer = self.viewer.add_image(
                    ov.data, name=ov.name, colormap=ov.colormap, contrast_limits=ov.limits, opacity=opacity,
                    blending="translucent", interpolation2d="nearest", metadata=ov.metadata, affine=ov.affine,
                    visible=ov.key == visible)
            self.layers[ov.key] = layer
        for layer in previous.values():
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        return self.layers

    def forget_removed(self) -> None:
        for key, layer in list(self.layers.items()):
            if layer not in self.viewer.layers:
                del self.layers[key]
