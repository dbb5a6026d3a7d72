"""The widget's points: a napari Points layer ("CDAM points") whose clicked points are explained.

napari's world coordinates are patient mm (z, y, x) (the CT layer's scale / translate / rotate), so a point of
the layer (no transform of its own) is a point in DICOM LPS mm once reversed to (x, y, z).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from lidc_cdam.viewer._overlays import META_KEY

POINTS = "CDAM points"
POINT_COLOUR = "#ffd700"  # gold: not a colour of the CDAM scale, nor of the nodule contours


def find_points_layer(viewer: Any) -> Any | None:
    """The widget's Points layer, if there is one."""
    for layer in viewer.layers:
        if (layer.metadata or {}).get(META_KEY, {}).get("kind") == "points":
            return layer
    return None


def make_points_layer(viewer: Any) -> Any:
    """A 3D Points layer for the points to explain, in add mode (each click on the scan adds a point)."""
    layer = viewer.add_points(np.empty((0, 3)), ndim=3, name=POINTS, size=4.0, face_color=POINT_COLOUR,
                              border_color="black", border_width=0.1, symbol="cross",
                              metadata={META_KEY: {"kind": "points"}})
    layer.mode = "add"
    return layer


def point_lps(world_zyx: Any) -> np.ndarray:
    """A napari world point (z, y, x) as DICOM LPS (x, y, z) mm."""
    return np.asarray(world_zyx, dtype=float)[-3:][::-1].copy()


def point_label(k: int, world_zyx: Any) -> str:
    x, y, z = point_lps(world_zyx)
    return f"P{k + 1} ({x:.1f}, {y:.1f}, {z:.1f}) mm"
