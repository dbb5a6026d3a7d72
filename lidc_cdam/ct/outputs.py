"""The one route from points of a CT to every file written: ``explain-ct`` and the viewer's export call this.

:func:`explain_points` streams: for each point it cuts the crop (:func:`~lidc_cdam.ct.point.crop_at_point`),
explains it with every task's checkpoints (:func:`~lidc_cdam.ct.ensemble.explain_tasks_steps`, concepts through
the one :class:`~lidc_cdam.ct.concepts.ConceptResolver`), writes the point's files (:func:`write_point`) into a
:class:`~lidc_cdam.ct.run_folder.RunFolder` and keeps only its small ``predictions.json`` entry, so memory does not
grow with the number of points. Complete points of an earlier run with the same settings are skipped. At the
end: ``predictions.csv``, ``summary.json`` and, with DICOM results, one Structured Report of every point (its
evidence lists the source series and every Parametric Map and Segmentation of the run).

Per point (``<out>/<point>/``): ``predictions.json`` (:func:`point_entry`), ``crop.npz``, ``maps.npz``, each target's
mean map (and the folds' sign agreement) on the scan's grid as NIfTI, ``report.png`` / ``report.pdf``, and with
``dicom`` each target's map as a Parametric Map and the crop's region as a Segmentation, both on the crop's own
1 mm grid (the source series' Frame of Reference: a few hundred kB per map, whatever the series' size).
Every file is written atomically; warnings about the volume and the crop go to the entry, the report, the
summary and ``warn`` (stderr for the CLI, the status line for the viewer).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lidc_cdam.ct.concepts import ConceptResolver
from lidc_cdam.ct.crop import CROP
from lidc_cdam.ct.dicom_results import (
    load_source_datasets,
    write_parametric_map,
    write_segmentation,
    write_structured_report,
)
from lidc_cdam.ct.ensemble import as_loaded, explain_tasks_steps, group_checkpoints
from lidc_cdam.ct.errors import CTError
from lidc_cdam.ct.export import export_nifti
from lidc_cdam.ct.maps import drain
from lidc_cdam.ct.placement import place_on_scan
from lidc_cdam.ct.point import PointResult, crop_at_point, to_world
from lidc_cdam.ct.report import write_point_report
from lidc_cdam.ct.run_folder import RunFolder
from lidc_cdam.ct.volume import CTVolume
from lidc_cdam.data.lidc.crops import ct_image, write_crop
from lidc_cdam.device import resolve_device
from lidc_cdam.io import atomic_write, write_json, write_npz
from lidc_cdam.models.demo_weights import sha256_of
from lidc_cdam.models.provenance import provenance_line, training_data, trust_warning
from lidc_cdam.models.provenance import training_data as of_models

Warn = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def volume_warnings(volume: CTVolume) -> list[str]:
    """The reader's warnings about a volume (one list, whatever the reader)."""
    warnings = volume.meta.get("warnings")
    if warnings is None:
        warnings = [volume.meta["warning"]] if volume.meta.get("warning") else []
    return [str(w) for w in warnings]


def map_names(ensembles: Sequence[Any]) -> list[list[str]]:
    """File stems per ensemble and target: the target's name, prefixed by its task when two ensembles share it."""
    count: dict[str, int] = {}
    for e in ensembles:
        for t in e.targets:
            count[t] = count.get(t, 0) + 1
    return [[t if count[t] == 1 else f"{e.task}{g}_{t}" for t in e.targets] for g, e in enumerate(ensembles)]


def trust_warnings(pid: str, result: PointResult) -> list[str]:
    out = []
    for e in result.ensembles:
        if e.trust and e.trust.get("unlike_training"):
            out.append(f"{pid}: {e.task} model(s): {trust_warning({'threshold': 99.0, **e.trust})}")
    if result.crop.padded_share > 0:
        out.append(f"{pid}: the crop crosses the volume's edge; {100 * result.crop.padded_share:.1f}% of it is "
                   "padding (-1000 HU)")
    return out


def point_entry(pid: str, result: PointResult, *, given: Sequence[float], given_as: str, method: str,
                ratings: dict[str, float] | None = None, warnings: Sequence[str] = (),
                training_data: dict[str, Any] | None = None) -> dict[str, Any]:
    """A point's ``predictions.json`` (without its ``files``): the point, its crop, per task the mean, sd, each
    checkpoint's predictions, the trust flag and the map file stems, and what the models were trained on
    (``training_data``, :func:`lidc_cdam.models.provenance.training_data`; computed here when not given)."""
    if training_data is None:

        training_data = of_models([as_loaded(c).model for e in result.ensembles for c in e.checkpoints])
    pc = result.crop
    tasks = []
    for e, stems in zip(result.ensembles, map_names(result.ensembles), strict=True):
        tasks.append({"task": e.task, "view": e.view, "targets": e.targets, "checkpoints": e.checkpoints,
                      "n_models": e.n, "mean": e.mean, "sd": e.sd, "per_checkpoint": e.per_model,
                      "trust": e.trust, "maps": dict(zip(e.targets, stems, strict=True))})
    return {"id": pid, "given": [float(v) for v in given], "given_as": given_as,
            "world_lps_mm": [float(v) for v in pc.point_world], "index_ijk": [float(v) for v in pc.point_index],
            "padded_share": pc.padded_share, "crop_size_mm": CROP, "crop_axes": "LPS (patient), [z, y, x]",
            "method": method, "view": result.ensembles[0].view if result.ensembles else None, "tasks": tasks,
            "ratings": dict(ratings or {}), "warnings": list(warnings), "training_data": training_data}


def rows_of(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``predictions.csv`` rows of a point (one per target) from its ``predictions.json``."""
    x, y, z = entry["world_lps_mm"]
    i, j, k = entry["index_ijk"]
    rows = []
    for task in entry["tasks"]:
        trust = task.get("trust") or {}
        for target in task["targets"]:
            rows.append({"point_id": entry["id"], "x": x, "y": y, "z": z, "i": i, "j": j, "k": k,
                         "padded_share": entry["padded_share"], "task": task["task"], "target": target,
                         "mean": task["mean"][target], "sd": task["sd"][target], "n_models": task["n_models"],
                         "radiologists": entry.get("ratings", {}).get(target),
                         "trust_percentile": trust.get("percentile"), "unlike_training": trust.get("unlike_training")})
    return rows


def sr_point(entry: dict[str, Any]) -> dict[str, Any]:
    """A point of the Structured Report (:func:`lidc_cdam.ct.dicom_results.write_structured_report`) from its entry."""
    predictions: dict[str, float] = {}
    spread: dict[str, float | None] = {}
    for task in entry["tasks"]:
        for target, stem in task["maps"].items():
            predictions[stem] = float(task["mean"][target])
            spread[stem] = float(task["sd"][target]) if task["n_models"] > 1 else None
    trusts = [t["trust"] for t in entry["tasks"] if t.get("trust")]
    worst = max(trusts, key=lambda t: t["percentile"]) if trusts else None
    return {"point_id": entry["id"], "position_mm": entry["world_lps_mm"], "predictions": predictions,
            "spread": spread, "trust_percentile": worst["percentile"] if worst else None,
            "trust_flag": worst["unlike_training"] if worst else None}


def write_point(folder: Path, entry: dict[str, Any], result: PointResult, volume: CTVolume, *, nifti: bool = True,
                report: bool = True, dicom_source: Any = None, series_base: int = 1000,
                checkpoint_hashes: dict[str, str] | None = None, series_label: str | None = None) -> dict[str, Any]:
    """Every file of one point in ``folder`` (see the module docstring); returns ``entry`` with its ``files``
    (the ``predictions.json`` written last)."""
    pc = result.crop
    write_crop(folder / "crop.npz", {**pc.crop, "padded": pc.padded.astype(np.uint8)})
    arrays: dict[str, np.ndarray] = {}
    files: dict[str, Any] = {"crop": "crop.npz", "maps": "maps.npz"}
    niftis: dict[str, str] = {}
    dicoms: list[str] = []
    if dicom_source is not None:
        seg = write_segmentation(dicom_source, np.ones(pc.image.shape, bool), f"explained region {entry['id']}",
                                 folder / "dicom" / "region_seg.dcm", series_number=series_base, crop=pc.crop)
        dicoms.append(str(seg.relative_to(folder)))
    number = series_base
    for e, stems in zip(result.ensembles, map_names(result.ensembles), strict=True):
        for k, stem in enumerate(stems):
            arrays[stem] = e.mean_maps[k]
            arrays[f"{stem}_agreement"] = e.agreement[k]
            if nifti:
                niftis[stem] = export_nifti(place_on_scan(e.mean_maps[k], pc.crop, volume), volume,
                                            folder / f"{stem}.nii.gz").name
                if e.n > 1:
                    niftis[f"{stem}_agreement"] = export_nifti(place_on_scan(e.agreement[k], pc.crop, volume), volume,
                                                               folder / f"{stem}_agreement.nii.gz").name
            if dicom_source is not None:
                number += 1
                pm = write_parametric_map(dicom_source, e.mean_maps[k], stem, folder / "dicom" / f"cdam_{stem}_pm.dcm",
                                          series_number=number, crop=pc.crop)
                dicoms.append(str(pm.relative_to(folder)))
    write_npz(folder / "maps.npz", **arrays)
    files["nifti"] = niftis
    if dicoms:
        files["dicom"] = dicoms
    entry = {**entry, "files": files}
    if report:
        png, pdf = write_point_report(entry, {**pc.crop, "padded": pc.padded}, arrays, folder,
                                      checkpoint_hashes=checkpoint_hashes, series=series_label,
                                      ratings=entry.get("ratings") or None)
        entry["files"]["report"] = {"png": png.name, "pdf": pdf.name}
    write_json(folder / "predictions.json", entry)
    return entry


def explain_points(volume: CTVolume, points: Sequence[tuple[str, Sequence[float]]], checkpoints: Sequence[Any],
                   out: str | Path, *, ijk: bool = False, method: str = "cdam", view: str | None = None,
                   slices: str = "all", margin: int = 3, options: dict[str, Any] | None = None,
                   concepts: ConceptResolver | None = None, ratings: dict[str, dict[str, float]] | None = None,
                   dicom: bool = False, nifti: bool = True, report: bool = True, series_label: str | None = None,
                   source: dict[str, Any] | None = None, warn: Warn = _stderr,
                   progress: Callable[[int, int], None] | None = None, device: Any = "auto") -> dict[str, Any]:
    """Explain ``points`` (``(id, point)``; ids already unique and safe: :func:`~lidc_cdam.ct.run_folder.point_ids`)
    of ``volume`` with ``checkpoints`` and write everything under ``out``; returns the summary (also written to
    ``summary.json``). Every check (the folder, the points, the checkpoints, the concepts) runs before any work.
    ``source`` describes the input for the summary (``"series"``: what was read; ``"pacs"``: where it came from);
    ``progress(done, total)`` counts explained slices batches; ``device`` (``auto``, ``cpu``, ``cuda[:N]``:
    :func:`lidc_cdam.device.resolve_device`) runs the models there."""
    concepts = concepts or ConceptResolver()
    if dicom and not volume.source_files:
        raise CTError("DICOM results (--dicom) reference the source series' instances, so the input must be a DICOM "
                      "series (this one has no DICOM source files, e.g. NIfTI or NRRD); run without DICOM results")
    device = resolve_device(device)
    groups = group_checkpoints(checkpoints)
    worlds = [to_world(volume, p, ijk) for _, p in points]  # every point checked before any work
    models = [m.to(device) for g in groups.values() for m in g]
    hashes = {str(m.path): sha256_of(m.path) for m in models}
    trained_on = training_data([m.model for m in models])
    settings = {"volume": {"name": volume.name, "shape_zyx": list(volume.shape),
                           "series_instance_uid": volume.meta.get("series_instance_uid"),
                           "source": volume.meta.get("source")},
                "checkpoints": hashes, "method": method, "view": view, "slices": slices, "margin": margin,
                "options": options or {}, "concepts": list(concepts.names), "dicom": dicom, "nifti": nifti,
                "report": report}
    folder = RunFolder(out, settings)
    dicom_source = None
    if dicom:
        dicom_source = load_source_datasets(volume)
    stale = folder.remove_stale([pid for pid, _ in points])
    if stale:
        warn(f"removed {len(stale)} point folder(s) of an earlier run that this run does not have: {stale}")
    vol_warnings = volume_warnings(volume)
    for w in vol_warnings:
        warn(f"{volume.name}: {w}")
    if trained_on["phantom_warning"]:
        warn(f"the model(s) {trained_on['phantom_warning']}")
    image = ct_image(volume.hu, volume.geometry())
    entries: list[dict[str, Any]] = []
    skipped: list[str] = []
    explain = {"method": method, "view": view, "slices": slices, "margin": margin, "options": options,
               "concept_task": ConceptResolver.task(models), **concepts.for_explain()}
    for n, ((pid, given), world) in enumerate(zip(points, worlds, strict=True)):
        done = folder.complete(pid, world)
        if done is not None:
            entries.append(done)
            skipped.append(pid)
            continue
        pc = crop_at_point(volume, world, image=image, point_id=pid)
        steps = explain_tasks_steps(models, pc.crop, where=pid, **explain)
        report_progress = (lambda d, t, n=n: progress(n * t + d, len(points) * t)) if progress else None
        result = PointResult(pc, drain(steps, report_progress))
        warnings = [*vol_warnings, *pc.warnings]
        for w in [*pc.warnings, *trust_warnings(pid, result)]:
            warn(w)
        entry = point_entry(pid, result, given=given, given_as="ijk" if ijk else "lps_mm", method=method,
                            ratings=(ratings or {}).get(pid), warnings=warnings, training_data=trained_on)
        with folder.point(pid, world) as partial:
            entry = write_point(partial, entry, result, volume, nifti=nifti, report=report, dicom_source=dicom_source,
                                series_base=1000 * (n + 1), checkpoint_hashes=hashes, series_label=series_label)
        entries.append(entry)
        del result, pc  # nothing of a point but its entry is kept
    summary = {
        "series": (source or {}).get("series", volume.meta.get("source")),
        "checkpoints": [str(m.path) for m in models], "method": method, "options": options or {},
        "slices": slices, "margin": margin, "concepts": list(concepts.names),
        **({"pacs": source["pacs"]} if source and source.get("pacs") else {}),
        "resumed": skipped, "removed_stale": stale}
    return finish_run(folder, entries, volume, trained_on=trained_on, dicom_source=dicom_source, summary=summary)


def finish_run(folder: RunFolder, entries: Sequence[dict[str, Any]], volume: CTVolume, *,
               trained_on: dict[str, Any], dicom_source: Any = None,
               summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's own files from its points' entries: ``predictions.csv``, with DICOM results (``dicom_source``)
    one Structured Report of every point (``dicom_sr.dcm``, the models' provenance as a text item, the Parametric
    Maps and Segmentations as evidence), and ``summary.json`` (``summary`` plus the volume, the points and the
    files); recorded in the manifest. :func:`explain_points` ends with it; the viewer's export calls it too."""
    import pandas as pd

    entries = list(entries)
    table = pd.DataFrame([row for e in entries for row in rows_of(e)])
    atomic_write(folder.root / "predictions.csv", lambda tmp: table.to_csv(tmp, index=False, lineterminator="\n"))
    run_files = ["predictions.csv", "summary.json"]
    warnings = volume_warnings(volume)
    summary = {
        **(summary or {}),
        "volume": {"name": volume.name, "shape_zyx": list(volume.shape), "spacing_xyz": list(volume.spacing),
                   "origin_xyz": list(volume.origin), "direction": list(volume.direction),
                   "series_instance_uid": volume.meta.get("series_instance_uid"), "warnings": warnings,
                   "warning": "; ".join(warnings) or None},
        "training_data": trained_on,
        "maps_note": "raw signed scores of each crop slice, resized to the 1 mm crop plane (patient axes), placed on "
                     "the scan's grid (linear), zero outside the crop; ensembles: the mean over the models",
        "points": entries,
        "reports": {e["id"]: {k: f"{e['id']}/{v}" for k, v in e["files"].get("report", {}).items()} for e in entries}}
    if dicom_source is not None:
        distinct = dict.fromkeys(json.dumps(m, sort_keys=True) for m in trained_on["models"])
        text = "; ".join([*(provenance_line(json.loads(m)) for m in distinct),
                          *([trained_on["phantom_warning"]] if trained_on["phantom_warning"] else [])])
        results = [folder.root / e["id"] / rel for e in entries for rel in e["files"].get("dicom", [])]
        write_structured_report(dicom_source, [sr_point(e) for e in entries], folder.root / "dicom_sr.dcm",
                                series_number=999, training_data=text, references=results)
        summary["dicom"] = {**{e["id"]: e["files"].get("dicom", []) for e in entries},
                            "structured_report": ["dicom_sr.dcm"]}
        run_files.append("dicom_sr.dcm")
    write_json(folder.root / "summary.json", summary)
    folder.record(*run_files)
    return summary
