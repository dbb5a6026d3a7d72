"""npe2 sample data: the synthetic chest CT with phantom nodules (no download)."""

from __future__ import annotations

from typing import Any


def synthetic_chest() -> list[tuple[Any, dict[str, Any], str]]:
    """The synthetic scan read back from its DICOM series, with its crops folder recorded in the layer's
    metadata (the CDAM widget picks it up as the nodule table)."""
    from lidc_cdam.viewer._reader import ct_layer_data

    from lidc_cdam.ct.synthetic import synthetic_data
    from lidc_cdam.ct.volume import read_dicom_folder

    paths = synthetic_data()
    volume = read_dicom_folder(paths["dicom"])
    volume.name = "CT synthetic chest (phantom nodules, not CT)"
    return [ct_layer_data(volume, crops_dir=str(paths["crops_dir"]))]
