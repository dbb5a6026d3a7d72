"""A synthetic chest CT with phantom nodules, so the viewer is usable with no download (napari's sample data).

**Not CT.** A crude chest (air, body, two lungs with vessels, a spine) on an anisotropic grid
(1.4 x 1.4 x 2.5 mm, 48 x 256 x 256 voxels, origin away from zero) with three phantom nodules: a solid
round one, a spiculated one and a ground-glass one. Their ratings are made up. The nodules' 32 mm crops are
cut exactly as ``lidc-cdam preprocess`` cuts real ones (:mod:`lidc_cdam.data.lidc.crops`), so the
viewer's nodule list, overlays and contours work on this scan as on a preprocessed LIDC-IDRI scan.

:func:`write_synthetic` writes ``OUT/dicom/`` (one CT DICOM file per slice), ``OUT/nodules.csv`` and
``OUT/crops/<nodule_id>.npz``; :func:`synthetic_data` keeps one copy in the lidc-cdam cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lidc_cdam.cache import cache_dir
from lidc_cdam.ct.dicom_writer import write_ct_series
from lidc_cdam.ct.volume import CTVolume
from lidc_cdam.data.lidc.crops import crop_nodule, crop_record, ct_image, write_crop
from lidc_cdam.io import atomic_write

SYNTHETIC_NOTE = "synthetic chest CT with phantom nodules written by lidc-cdam's viewer: not CT"
PATIENT_ID = "SYNTHETIC-0001"
VERSION = 1
SHAPE = (48, 256, 256)  # z, y, x
SPACING = (1.4, 1.4, 2.5)  # x, y, z mm
ORIGIN = (-178.5, -191.0, -260.0)  # x, y, z mm


@dataclass(frozen=True)
class PhantomNodule:
    nodule_id: str
    centre_mm: tuple[float, float, float]  # (x, y, z) patient mm
    radius_mm: float
    hu: float
    spikes: int
    ratings: dict[str, float]
    label: int


NODULES = (
    PhantomNodule(f"{PATIENT_ID}_n01", (-75.0, -35.0, -205.0), 7.0, 30.0, 0,
                  {"subtlety": 5, "calcification": 6, "sphericity": 4.7, "margin": 4.7, "lobulation": 1.3,
                   "spiculation": 1.0, "texture": 5, "diameter_mm": 14.0}, 0),
    PhantomNodule(f"{PATIENT_ID}_n02", (70.0, -50.0, -180.0), 8.0, 20.0, 9,
                  {"subtlety": 5, "calcification": 6, "sphericity": 3.3, "margin": 2.0, "lobulation": 3.7,
                   "spiculation": 4.3, "texture": 5, "diameter_mm": 19.0}, 1),
    PhantomNodule(f"{PATIENT_ID}_n03", (-60.0, -5.0, -160.0), 6.0, -550.0, 0,
                  {"subtlety": 3, "calcification": 6, "sphericity": 4.0, "margin": 3.0, "lobulation": 1.7,
                   "spiculation": 1.3, "texture": 1.7, "diameter_mm": 12.0}, 0),
)


def _grid(shape=SHAPE, spacing=SPACING, origin=ORIGIN) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z = origin[2] + spacing[2] * np.arange(shape[0], dtype=np.float32)
    y = origin[1] + spacing[1] * np.arange(shape[1], dtype=np.float32)
    x = origin[0] + spacing[0] * np.arange(shape[2], dtype=np.float32)
    return z[:, None, None], y[None, :, None], x[None, None, :]


def nodule_mask(nod: PhantomNodule, zz, yy, xx, seed: int = 0) -> np.ndarray:
    """The phantom nodule on the grid: a sphere, optionally with spikes (thin cones) around it."""
    dz, dy, dx = zz - nod.centre_mm[2], yy - nod.centre_mm[1], xx - nod.centre_mm[0]
    r = np.sqrt(dx**2 + dy**2 + dz**2)
    mask = r <= nod.radius_mm
    if nod.spikes:
        rng = np.random.default_rng(seed + 17)
        for _ in range(nod.spikes):
            v = rng.normal(size=3)
            v /= np.linalg.norm(v)
            length = nod.radius_mm * rng.uniform(1.5, 1.9)
            along = dx * v[0] + dy * v[1] + dz * v[2]
            perp = np.sqrt(np.maximum(r**2 - along**2, 0.0))
            width = 2.2 * np.clip(1.0 - along / length, 0.0, 1.0)
            mask |= (along > 0) & (along < length) & (perp <= width)
    return mask


def synthetic_scan(seed: int = 0) -> tuple[CTVolume, list[np.ndarray]]:
    """The synthetic scan (HU int16 ``[z, y, x]``) and each nodule's mask on its grid (bool ``[z, y, x]``)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    zz, yy, xx = _grid()
    shape = SHAPE
    cx, cy = ORIGIN[0] + SPACING[0] * (shape[2] - 1) / 2, ORIGIN[1] + SPACING[1] * (shape[1] - 1) / 2
    body = ((xx - cx) / 165.0) ** 2 + ((yy - cy - 10) / 120.0) ** 2 <= 1.0
    lung_r = ((xx - cx + 75) / 62.0) ** 2 + ((yy - cy + 5) / 92.0) ** 2 <= 1.0
    lung_l = ((xx - cx - 75) / 62.0) ** 2 + ((yy - cy + 5) / 92.0) ** 2 <= 1.0
    spine = ((xx - cx) / 16.0) ** 2 + ((yy - cy - 95) / 16.0) ** 2 <= 1.0
    lungs = np.broadcast_to(lung_r | lung_l, shape)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[np.broadcast_to(body, shape)] = 40.0
    hu[lungs] = -860.0
    hu[np.broadcast_to(spine, shape)] = 500.0
    # vessels: smooth random field thresholded into thin branching structures inside the lungs
    field = gaussian_filter(rng.normal(size=shape).astype(np.float32), (1.0, 2.0, 2.0))
    field /= field.std() + 1e-6
    vessels = lungs & (np.abs(field) < 0.06)
    hu[vessels] = -100.0
    masks = []
    for n, nod in enumerate(NODULES):
        mask = nodule_mask(nod, zz, yy, xx, seed + n) & lungs
        hu[mask] = nod.hu
        masks.append(mask)
    hu += rng.normal(0.0, 12.0, size=shape).astype(np.float32)
    hu = gaussian_filter(hu, (0.4, 0.6, 0.6))
    hu[~np.broadcast_to(body, shape)] = -1000.0
    vol = CTVolume(np.clip(np.rint(hu), -1024, 3071).astype(np.int16), SPACING, ORIGIN,
                   name=f"CT {PATIENT_ID} (synthetic)",
                   meta={"patient_id": PATIENT_ID, "source": "synthetic", "note": SYNTHETIC_NOTE})
    return vol, masks


def write_dicom(volume: CTVolume, folder: str | Path, patient_id: str | None = None, **options: Any) -> Path:
    """``volume`` (axial) as a CT DICOM series, one file per slice (HU stored with intercept -1024): see
    :func:`lidc_cdam.ct.dicom_writer.write_ct_series` (``options``: ``fresh_uids``, ``study_date``...)."""
    return write_ct_series(volume, folder, patient_id, **options)


def crop_rows(volume: CTVolume, masks: list[np.ndarray], out_dir: str | Path) -> list[dict[str, Any]]:
    """Cut and write each nodule's crop as ``lidc-cdam preprocess`` does; returns the table rows."""
    out_dir = Path(out_dir)
    geom = volume.geometry()
    image = ct_image(volume.hu, geom)
    rows = []
    for nod, mask in zip(NODULES, masks, strict=True):
        idx = np.argwhere(mask)
        lo, hi = idx.min(0), idx.max(0) + 1  # z, y, x
        sub = mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        cmask_ijk = np.transpose(sub, (1, 2, 0))  # [i row, j column, k slice]
        start_ijk = np.array([lo[1], lo[2], lo[0]])
        centre_ijk = np.array([(lo[1] + hi[1] - 1) / 2, (lo[2] + hi[2] - 1) / 2, (lo[0] + hi[0] - 1) / 2])
        crop = crop_nodule(image, geom, cmask_ijk, start_ijk, centre_ijk)
        rec = crop_record(crop, geom, nod.nodule_id, centre_ijk, "synthetic", SYNTHETIC_NOTE)
        rel = f"crops/{nod.nodule_id}.npz"
        write_crop(out_dir / rel, rec)
        rows.append({"nodule_id": nod.nodule_id, "patient_id": PATIENT_ID, "label": nod.label,
                     "label_name": "malignant" if nod.label else "benign", **nod.ratings, "crop_path": rel,
                     "mask_voxels": int(crop["mask"].sum()), "source": "synthetic"})
    return rows


def write_synthetic(out_dir: str | Path, seed: int = 0, dicom: bool = True) -> dict[str, Path]:
    """Write the synthetic scan's DICOM series, crops and ``nodules.csv`` under ``out_dir``."""
    import pandas as pd

    out_dir = Path(out_dir)
    volume, masks = synthetic_scan(seed)
    rows = crop_rows(volume, masks, out_dir)
    table = pd.DataFrame(rows)
    atomic_write(out_dir / "nodules.csv", lambda tmp: table.to_csv(tmp, index=False, lineterminator="\n"))
    (out_dir / "NOTE.txt").write_text(SYNTHETIC_NOTE + "\n")
    paths = {"root": out_dir, "crops_dir": out_dir, "table": out_dir / "nodules.csv"}
    if dicom:
        paths["dicom"] = write_dicom(volume, out_dir / "dicom")
    return paths


def synthetic_data(root: str | Path | None = None) -> dict[str, Path]:
    """The synthetic scan written once into ``root`` (default: the lidc-cdam cache); returns its paths."""
    root = Path(root) if root is not None else cache_dir() / "viewer" / f"synthetic-v{VERSION}"
    paths = {"root": root, "crops_dir": root, "table": root / "nodules.csv", "dicom": root / "dicom"}
    done = root / "DONE"
    if not done.exists():
        write_synthetic(root)
        done.write_text("ok\n")
    return paths
