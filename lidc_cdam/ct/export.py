"""Results written for other tools: arrays on the scan's grid as NIfTI (3D Slicer, ITK-SNAP)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lidc_cdam.ct.volume import CTVolume


def export_nifti(array_zyx: np.ndarray, volume: CTVolume, path: str | Path) -> Path:
    """An array on the scan's grid as NIfTI (SimpleITK writes the scan's geometry; opens aligned with the
    CT in 3D Slicer or ITK-SNAP)."""
    import SimpleITK as sitk

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(volume.to_sitk(array_zyx), str(path), useCompression=True)
    return path
