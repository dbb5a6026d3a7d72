"""Crops cut by the code of the moment, for ``tests/test_patient_axes.py``: ``python make_reference.py OUT.npz``.

``before_patient_axes.npz`` was written with this script by the code before crops moved to the patient grid
(commit ebdc273): phantom crops of 2 LIDC-IDRI scans, the synthetic chest scan's nodule crops and 3 point crops
(one crossing the scan's edge). The test runs it again and requires the same arrays. The synthetic scan is
rendered in its version-1 look (``look="v1"``), the one the reference was cut from. Since phantoms render every
biomarker's cause (issue 22), only the phantom crops' geometry is compared (``crop_to_world``, ``start_resampled``).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from lidc_cdam.ct.point import crop_at_point
from lidc_cdam.ct.synthetic import synthetic_scan, write_synthetic
from lidc_cdam.data.lidc.crops import read_crop
from lidc_cdam.data.lidc.phantoms import build_phantoms

POINTS = [(-20.0, 10.0, -200.0), (60.3, -40.7, -180.2), (-170.0, -185.0, -255.0)]


def crops_now() -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_phantoms(root / "ph", n_scans=2, progress=False)
        write_synthetic(root / "syn", dicom=False, look="v1")  # the look the reference was cut from
        for kind, folder in (("phantom", root / "ph"), ("synthetic", root / "syn")):
            for f in sorted((folder / "crops").glob("*.npz")):
                c = read_crop(f)
                # phantom images and masks changed on purpose when every biomarker got a rendered cause
                # (phantom_causes.py); their geometry must not change
                keys = ("crop_to_world", "start_resampled") if kind == "phantom" else (
                    "image", "mask", "crop_to_world", "start_resampled")
                for key in keys:
                    out[f"{kind}/{f.stem}/{key}"] = c[key]
    vol, _ = synthetic_scan(look="v1")
    for k, p in enumerate(POINTS):
        pc = crop_at_point(vol, p)
        out[f"point/{k}/image"] = pc.crop["image"]
        out[f"point/{k}/crop_to_world"] = pc.crop["crop_to_world"]
        out[f"point/{k}/padded"] = pc.padded.astype(np.uint8)
    return out


if __name__ == "__main__":
    np.savez_compressed(sys.argv[1], **crops_now())
