"""Results written for other tools: arrays on the scan's grid as NIfTI (3D Slicer, ITK-SNAP), written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lidc_cdam.ct.volume import CTVolume
from lidc_cdam.io import atomic_write


def export_nifti(array_zyx: np.ndarray, volume: CTVolume, path: str | Path) -> Path:
    """An array on the scan's grid as NIfTI (SimpleITK writes the scan's geometry; opens aligned with the
    CT in 3D Slicer or ITK-SNAP)."""
    import SimpleITK as sitk

    image = volume.to_sitk(array_zyx)
    return atomic_write(path, lambda tmp: sitk.WriteImage(image, str(tmp), useCompression=True), keep_suffix=True)
