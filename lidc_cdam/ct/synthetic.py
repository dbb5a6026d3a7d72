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
VERSION = 2  # 2: the lungs and nodules rendered as the training phantoms are (look="phantom")
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


LOOKS = ("phantom", "v1")


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma_mm: float) -> np.ndarray:
    """Unit-variance Gaussian noise smoothed by ``sigma_mm`` on the scan's anisotropic grid."""
    from scipy.ndimage import gaussian_filter

    sigma = (sigma_mm / SPACING[2], sigma_mm / SPACING[1], sigma_mm / SPACING[0])
    field = gaussian_filter(rng.normal(size=shape).astype(np.float32), sigma, mode="wrap")
    return field / (field.std() + 1e-8)


def _vessels(rng: np.random.Generator, lungs: np.ndarray, zz, yy, xx) -> np.ndarray:
    """Partial-volume weights [0, 1] of straight vessel tubes (radius 0.7-1.8 mm) in the lungs: about three
    32 mm segments per 32 mm cube of lung, as the training phantoms' background has 2-4 tubes per crop."""
    weight = np.zeros(lungs.shape, dtype=np.float32)
    cells = np.argwhere(lungs)
    n = round(3 * lungs.sum() * SPACING[0] * SPACING[1] * SPACING[2] / 32.0**3)
    step = np.array([SPACING[2], SPACING[1], SPACING[0]])  # z, y, x mm per voxel
    for _ in range(n):
        centre = cells[int(rng.integers(len(cells)))]
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)  # z, y, x
        radius = rng.uniform(0.7, 1.8)
        half = np.ceil((16.0 + radius + 1.0) / step).astype(int)
        lo, hi = np.maximum(centre - half, 0), np.minimum(centre + half + 1, lungs.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        rel = [g.reshape(-1)[box[k]].reshape([-1 if j == k else 1 for j in range(3)]) - float(g.reshape(-1)[centre[k]])
               for k, g in enumerate((zz, yy, xx))]
        along = rel[0] * direction[0] + rel[1] * direction[1] + rel[2] * direction[2]
        perp = np.sqrt(np.maximum(rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2 - along**2, 0.0))
        w = np.clip(radius + 0.5 - perp, 0.0, 1.0) * (np.abs(along) <= 16.0)
        weight[box] = np.maximum(weight[box], w)
    return weight


def synthetic_scan(seed: int = 0, look: str = "phantom") -> tuple[CTVolume, list[np.ndarray]]:
    """The synthetic scan (HU int16 ``[z, y, x]``) and each nodule's mask on its grid (bool ``[z, y, x]``).

    ``look="phantom"`` (the default): lungs and nodules rendered as the training phantoms are
    (:mod:`lidc_cdam.data.lidc.phantom_render`): parenchyma at -850 HU with correlated noise (25 HU, 1.5 mm),
    vessels as +40 HU tubes with partial volume, nodules at the HU of their texture rating (-650 HU for 1 to
    20 HU for 5) with correlated noise (40 HU, 1 mm) and a soft edge; so the shipped phantom models see
    their kind of data. ``look="v1"``: the crude look of version 1 (flat -860 HU lungs, thresholded vessels,
    flat nodules, white noise), kept for ``tests/data/crops/make_reference.py``."""
    from scipy.ndimage import gaussian_filter

    if look not in LOOKS:
        raise ValueError(f"look must be one of {LOOKS}, got {look!r}")
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
    hu[np.broadcast_to(spine, shape)] = 500.0
    masks = [nodule_mask(nod, zz, yy, xx, seed + n) & lungs for n, nod in enumerate(NODULES)]
    if look == "v1":
        hu[lungs] = -860.0
        # vessels: smooth random field thresholded into thin branching structures inside the lungs
        field = gaussian_filter(rng.normal(size=shape).astype(np.float32), (1.0, 2.0, 2.0))
        field /= field.std() + 1e-6
        hu[lungs & (np.abs(field) < 0.06)] = -100.0
        for nod, mask in zip(NODULES, masks, strict=True):
            hu[mask] = nod.hu
        hu += rng.normal(0.0, 12.0, size=shape).astype(np.float32)
        hu = gaussian_filter(hu, (0.4, 0.6, 0.6))
    else:
        lung = -850.0 + 25.0 * _smooth_field(rng, shape, 1.5)
        weight = _vessels(rng, lungs, zz, yy, xx)
        lung = lung * (1 - weight) + 40.0 * weight
        hu = np.where(lungs, lung, hu)
        body_tissue = np.broadcast_to(body, shape) & ~lungs
        hu = np.where(body_tissue, hu + 20.0 * _smooth_field(rng, shape, 1.0), hu)
        for nod, mask in zip(NODULES, masks, strict=True):
            texture = float(nod.ratings["texture"])
            solid = float(np.interp(texture, [1, 5], [-650.0, 20.0]))
            inside = solid + 40.0 * _smooth_field(rng, shape, 1.0)
            soft = np.clip(gaussian_filter(mask.astype(np.float32), (0.3, 0.5, 0.5)) * 1.0, 0.0, 1.0)
            soft = np.where(mask, np.maximum(soft, 0.5), soft) * lungs
            hu = hu * (1 - soft) + inside * soft
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


def write_synthetic(out_dir: str | Path, seed: int = 0, dicom: bool = True, look: str = "phantom"
                    ) -> dict[str, Path]:
    """Write the synthetic scan's DICOM series, crops and ``nodules.csv`` under ``out_dir``."""
    import pandas as pd

    out_dir = Path(out_dir)
    volume, masks = synthetic_scan(seed, look)
    rows = crop_rows(volume, masks, out_dir)
    table = pd.DataFrame(rows)
    atomic_write(out_dir / "nodules.csv", lambda tmp: table.to_csv(tmp, index=False, lineterminator="\n"))
    atomic_write(out_dir / "NOTE.txt", lambda tmp: tmp.write_text(SYNTHETIC_NOTE + "\n"))
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
        atomic_write(done, lambda tmp: tmp.write_text("ok\n"))  # last: the folder is complete
    return paths
