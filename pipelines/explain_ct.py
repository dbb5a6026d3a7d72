"""`lidc-cdam explain-ct`: predictions and CDAM maps at points of any CT (DICOM series folder or file, NIfTI).

For each point (patient mm, DICOM LPS x y z; or with --ijk a voxel index i j k along the scan's x, y, z axes)
the 32 mm crop at 1 mm is cut as the LIDC-IDRI preprocessing cuts a nodule's (padded with -1000 HU where it
crosses the volume's edge; the padded share is reported) and every checkpoint explains it. Checkpoints of one
task (e.g. the five folds of `lidc-cdam train`) form an ensemble: mean prediction and its sd, mean map per
target, and the sign agreement of the folds' maps. Written under --out:

  predictions.csv                 one row per point and target: mean, sd, number of models, padded share,
                                  trust, and the radiologists' rating where the points CSV gives one
  summary.json                    the series, the settings and, per point, the files below
  POINT/predictions.json          the point, its crop, per task: mean, sd and each checkpoint's predictions
  POINT/TARGET.nii.gz             the (mean) map of a target on the scan's grid (zero outside the crop)
  POINT/TARGET_agreement.nii.gz   share of the models whose map has the mean map's sign (ensembles of 2+)
  POINT/crop.npz, POINT/maps.npz  the crop (as the nodule crops' .npz, + `padded`) and the maps on its
                                  1 mm grid
  POINT/report.png, report.pdf    a report page: the crop, each target's map over it, the predictions and
                                  their spread, the trust flag, the models' SHA-256; research use only

The NIfTI files carry the scan's geometry: they open aligned with the CT in 3D Slicer or ITK-SNAP.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lidc_cdam.ct.errors import CTError

log = logging.getLogger("lidc_cdam.explain_ct")
METHOD_CHOICES = ("cdam", "smooth-cdam", "integrated-cdam", "attention")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("series", type=Path, help="a CT: DICOM series folder (or a patient folder above it), a "
                                                  "DICOM file of the series, or a NIfTI file (.nii, .nii.gz)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--point", nargs=3, type=float, action="append", metavar=("X", "Y", "Z"),
                       help="a point in patient mm, DICOM LPS (with --ijk: a voxel index I J K); repeat for more")
    where.add_argument("--points", type=Path, metavar="CSV",
                       help="a CSV file of points: columns x,y,z (with --ijk: i,j,k), an optional id, and optional "
                            "radiologists' ratings in columns named as the targets (malignancy, subtlety, ..., "
                            "diameter_mm), shown beside the predictions")
    parser.add_argument("--ijk", action="store_true",
                        help="points are voxel indices (i, j, k) along the scan's x (column), y (row), z (slice) axes")
    parser.add_argument("--checkpoint", nargs="+", type=Path, required=True, metavar="PT",
                        help="LIDC checkpoints (malignancy and/or biomarkers); several of one task form an ensemble")
    parser.add_argument("--method", default="cdam", choices=METHOD_CHOICES, help="importance estimator")
    parser.add_argument("--n", type=int, default=50, help="samples of Smooth / Integrated CDAM")
    parser.add_argument("--view", choices=("axial", "coronal", "sagittal"),
                        help="slicing view (default: the view the checkpoints were trained on)")
    parser.add_argument("--slices", choices=("all", "centre"), default="all",
                        help="explain all 32 crop slices along the view, or the centre slice +- --margin")
    parser.add_argument("--margin", type=int, default=3)
    parser.add_argument("--series-uid", dest="series_uid",
                        help="the series of a folder with several: a SeriesInstanceUID or an index")
    parser.add_argument("--concept", nargs="+", default=[], metavar="NAME",
                        help="also radiological concepts (concept CDAM, Eq. 4) on the malignancy model(s), e.g. "
                             "spiculated round-contrast (data_manifest/lidc_concepts.yaml); needs --concept-data")
    parser.add_argument("--concept-data", dest="concept_data", type=Path, metavar="DIR",
                        help="rated example nodules for --concept: a preprocess or phantoms folder (nodules.csv + "
                             "crops/); each checkpoint uses its own training fold only")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--dicom", action="store_true",
                        help="also write DICOM results for a PACS (DICOM input only): each CDAM as a Parametric Map, "
                             "the explained region as a Segmentation, the predictions as a TID 1500 SR")


# ------------------------------------------------------------------------------------------ points


def safe_id(raw: Any, n: int) -> str:
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", str(raw)).strip("._")
    return text or f"p{n + 1:02d}"


def rating_columns() -> list[str]:
    """Columns of a points CSV read as the radiologists' ratings: the targets' names."""
    from lidc_cdam.ct.checkpoint import MALIGNANCY
    from lidc_cdam.data.lidc.nodules import BIOMARKERS

    return [MALIGNANCY, *BIOMARKERS]


def read_points(args: argparse.Namespace) -> list[tuple[str, tuple[float, float, float]]]:
    """``[(id, (3 numbers))]`` from --point or --points; :class:`CTError` for a bad CSV. The ratings columns of a
    CSV are in ``args.ratings`` (id -> {target: rating}) afterwards."""
    args.ratings = {}
    if args.point:
        raw = [(f"p{n + 1:02d}", tuple(p)) for n, p in enumerate(args.point)]
    else:
        import pandas as pd

        path: Path = args.points
        try:
            frame = pd.read_csv(path)
        except (OSError, ValueError) as err:
            raise CTError(f"{path}: not a readable CSV file of points ({err})") from None
        frame.columns = [str(c).strip().lower() for c in frame.columns]
        cols = ["i", "j", "k"] if args.ijk else ["x", "y", "z"]
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise CTError(f"{path}: no column(s) {missing}; expected {','.join(cols)} (and an optional id), "
                          f"found {list(frame.columns)}" + ("" if args.ijk else "; voxel indices need --ijk"))
        if frame.empty:
            raise CTError(f"{path}: no points")
        values = frame[cols].apply(pd.to_numeric, errors="coerce")
        bad = values.isna().any(axis=1) | ~np.isfinite(values.to_numpy(dtype=float)).all(axis=1)
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise CTError(f"{path}: row {row + 2} has no number in {cols}: {frame.iloc[row][cols].tolist()}")
        ids = frame["id"].tolist() if "id" in frame.columns else [None] * len(frame)
        raw = [(safe_id(i, n) if i is not None else f"p{n + 1:02d}", tuple(float(v) for v in row))
               for n, (i, row) in enumerate(zip(ids, values.to_numpy(dtype=float), strict=True))]
        given = [c for c in rating_columns() if c in frame.columns]
        ratings = frame[given].apply(pd.to_numeric, errors="coerce") if given else None
    seen: dict[str, int] = {}
    out = []
    for n, (pid, p) in enumerate(raw):
        seen[pid] = seen.get(pid, 0) + 1
        unique = pid if seen[pid] == 1 else f"{pid}_{seen[pid]}"
        out.append((unique, p))
        if not args.point and ratings is not None:
            known = {c: float(v) for c, v in ratings.iloc[n].items() if np.isfinite(v)}
            if known:
                args.ratings[unique] = known
    return out


# ------------------------------------------------------------------------------------------ hooks


def check_dicom_input(volume) -> None:
    """``--dicom`` needs a DICOM series as input: the results reference its instances."""
    if not getattr(volume, "source_files", ()):
        raise CTError("--dicom: the DICOM results reference the source series' instances, so the input must be "
                      "a DICOM series (this one has no DICOM source files, e.g. NIfTI); run without --dicom")


def write_dicom_results(volume, results, out: Path) -> dict[str, list[str]]:
    """The DICOM results of :mod:`lidc_cdam.ct.dicom_results` for ``results`` ``[(point_id, PointResult)]``:
    per point, each target's mean CDAM on the scan grid as a Parametric Map and the explained region (the
    32 mm crop) as a Segmentation, in ``<out>/<point>/dicom/``; one TID 1500 Structured Report with every
    point's predictions and spread in ``<out>/dicom_sr.dcm``. Returns the files written per point."""
    from lidc_cdam.ct.dicom_results import (
        load_source_datasets,
        write_parametric_map,
        write_segmentation,
        write_structured_report,
    )
    from lidc_cdam.ct.placement import place_on_scan

    source = load_source_datasets(volume)
    written: dict[str, list[str]] = {}
    sr_points = []
    series_number = 901
    for pid, result in results:
        folder = out / pid / "dicom"
        files = []
        region = place_on_scan(np.ones((32, 32, 32), np.uint8), result.crop.crop, volume, linear=False) > 0
        files.append(write_segmentation(source, region, f"explained region {pid}", folder / "region_seg.dcm",
                                        series_number=series_number))
        predictions: dict[str, float] = {}
        spread: dict[str, float | None] = {}
        for e, stems in zip(result.ensembles, map_names(result.ensembles), strict=True):
            for k, (target, stem) in enumerate(zip(e.targets, stems, strict=True)):
                series_number += 1
                on_scan = place_on_scan(e.mean_maps[k], result.crop.crop, volume)
                files.append(write_parametric_map(source, on_scan, stem, folder / f"cdam_{stem}_pm.dcm",
                                                  series_number=series_number))
                predictions[stem] = float(e.mean[target])
                spread[stem] = float(e.sd[target]) if e.n > 1 else None
        series_number += 1
        trusts = [e.trust for e in result.ensembles if e.trust]
        worst = max(trusts, key=lambda t: t["percentile"]) if trusts else None
        sr_points.append({"point_id": pid, "position_mm": [float(v) for v in result.crop.point_world],
                          "predictions": predictions, "spread": spread,
                          "trust_percentile": worst["percentile"] if worst else None,
                          "trust_flag": worst["unlike_training"] if worst else None})
        written[pid] = [str(f.relative_to(out)) for f in files]
    sr = write_structured_report(source, sr_points, out / "dicom_sr.dcm", series_number=series_number)
    written["structured_report"] = [str(sr.relative_to(out))]
    return written


def write_report(entry: dict[str, Any], crop: dict[str, Any], maps: dict[str, np.ndarray], folder: Path,
                 hashes: dict[str, str], series: str) -> dict[str, str]:
    """The point's report page (:func:`lidc_cdam.ct.report.write_point_report`): ``report.png`` and
    ``report.pdf`` in its folder (with the radiologists' ratings of ``entry["ratings"]``); returns their names as
    ``predictions.json`` lists them."""
    from lidc_cdam.ct.report import write_point_report

    png, pdf = write_point_report(entry, crop, maps, folder, checkpoint_hashes=hashes, series=series,
                                  ratings=entry.get("ratings") or None)
    return {"png": png.name, "pdf": pdf.name}


# ------------------------------------------------------------------------------------------ run


def concept_resolver(args: argparse.Namespace, groups: list[list[Any]]) -> tuple[Any, Any]:
    """``(concepts(model), the group that explains them)`` for --concept: the malignancy models (else the first
    task's), each model's concept vectors from its own training fold of --concept-data (computed once per model);
    ``(None, None)`` without --concept."""
    if not args.concept:
        return None, None
    if args.concept_data is None:
        raise CTError("--concept needs --concept-data DIR (rated example nodules: nodules.csv + crops/)")
    from lidc_cdam.data.lidc.concepts import ConceptError, concept_targets, read_concept_definitions

    try:
        for name in args.concept:
            read_concept_definitions().definition(name)
    except ConceptError as err:
        raise CTError(str(err)) from None
    group = next((g for g in groups if g[0].task == "malignancy"), groups[0])
    known: dict[str, list] = {}

    def concepts(model: Any) -> list:
        if model.fingerprint not in known:
            try:
                known[model.fingerprint] = concept_targets(model.model, args.concept_data, names=args.concept)
            except ConceptError as err:
                raise CTError(f"--concept: {err}") from None
        return known[model.fingerprint]

    return concepts, group


def map_names(ensembles) -> list[list[str]]:
    """File stems per ensemble and target: the target's name, prefixed by its task when two ensembles share it."""
    count: dict[str, int] = {}
    for e in ensembles:
        for t in e.targets:
            count[t] = count.get(t, 0) + 1
    return [[t if count[t] == 1 else f"{e.task}{g}_{t}" for t in e.targets] for g, e in enumerate(ensembles)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from lidc_cdam.ct.crop import CROP
    from lidc_cdam.ct.ensemble import explain_crop, group_checkpoints
    from lidc_cdam.ct.export import export_nifti
    from lidc_cdam.ct.placement import place_on_scan
    from lidc_cdam.ct.point import PointResult, crop_at_point, to_world
    from lidc_cdam.ct.read import read_ct
    from lidc_cdam.data.lidc.crops import ct_image, write_crop
    from lidc_cdam.io import atomic_write, write_json, write_npz
    from lidc_cdam.models.demo_weights import sha256_of

    if args.n < 1 or args.margin < 0:
        raise CTError("--n must be >= 1 and --margin >= 0")
    points = read_points(args)
    series = int(args.series_uid) if args.series_uid and args.series_uid.isdigit() else args.series_uid
    volume = read_ct(args.series, series)
    if args.dicom:
        check_dicom_input(volume)
    groups = group_checkpoints(args.checkpoint)
    concepts, concept_group = concept_resolver(args, list(groups.values()))
    worlds = [to_world(volume, p, args.ijk) for _, p in points]  # every point checked before any work
    options = {"n": args.n} if args.method in ("smooth-cdam", "integrated-cdam") else {}
    slices = "nodule" if args.slices == "centre" else "all"  # a point's crop has no mask: centre +- margin
    image = ct_image(volume.hu, volume.geometry())
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    entries: list[dict[str, Any]] = []
    results: list[tuple[str, PointResult]] = []
    n_models = sum(len(g) for g in groups.values())
    hashes = {str(m.path): sha256_of(m.path) for models in groups.values() for m in models}
    series_label = f"{volume.name} ({args.series})" if volume.name and volume.name != str(args.series) \
        else str(args.series)
    with tqdm(total=len(points) * n_models, desc="explaining points", unit="model",
              disable=not sys.stderr.isatty()) as bar:
        for (pid, given), world in zip(points, worlds, strict=True):
            pc = crop_at_point(volume, world, image=image, point_id=pid)
            ensembles = [explain_crop(models, pc.crop, method=args.method, view=args.view, slices=slices,
                                      margin=args.margin, options=options, where=pid, progress=bar.update,
                                      concepts=concepts if models is concept_group else None)
                         for models in groups.values()]
            result = PointResult(pc, ensembles)
            results.append((pid, result))
            folder = out / pid
            write_crop(folder / "crop.npz", {**pc.crop, "padded": pc.padded.astype(np.uint8)})
            arrays: dict[str, np.ndarray] = {}
            files: dict[str, str] = {}
            tasks = []
            for e, stems in zip(ensembles, map_names(ensembles), strict=True):
                for k, (target, stem) in enumerate(zip(e.targets, stems, strict=True)):
                    arrays[stem] = e.mean_maps[k]
                    arrays[f"{stem}_agreement"] = e.agreement[k]
                    files[stem] = export_nifti(place_on_scan(e.mean_maps[k], pc.crop, volume), volume,
                                               folder / f"{stem}.nii.gz").name
                    if e.n > 1:
                        files[f"{stem}_agreement"] = export_nifti(
                            place_on_scan(e.agreement[k], pc.crop, volume), volume,
                            folder / f"{stem}_agreement.nii.gz").name
                    rows.append({"point_id": pid, "x": world[0], "y": world[1], "z": world[2],
                                 "i": pc.point_index[0], "j": pc.point_index[1], "k": pc.point_index[2],
                                 "padded_share": pc.padded_share, "task": e.task, "target": target,
                                 "mean": e.mean[target], "sd": e.sd[target], "n_models": e.n,
                                 "radiologists": args.ratings.get(pid, {}).get(target),
                                 "trust_percentile": e.trust["percentile"] if e.trust else None,
                                 "unlike_training": e.trust["unlike_training"] if e.trust else None})
                tasks.append({"task": e.task, "view": e.view, "targets": e.targets, "checkpoints": e.checkpoints,
                              "n_models": e.n,
                              "mean": e.mean, "sd": e.sd, "per_checkpoint": e.per_model, "trust": e.trust,
                              "maps": {t: s for t, s in zip(e.targets, stems, strict=True)}})
            write_npz(folder / "maps.npz", **arrays)
            entry = {"id": pid, "given": list(given), "given_as": "ijk" if args.ijk else "lps_mm",
                     "world_lps_mm": world.tolist(), "index_ijk": pc.point_index.tolist(),
                     "padded_share": pc.padded_share, "crop_size_mm": CROP, "method": args.method,
                     "view": ensembles[0].view, "tasks": tasks, "ratings": args.ratings.get(pid, {}),
                     "files": {"crop": "crop.npz", "maps": "maps.npz", "nifti": files}}
            for e in ensembles:
                if e.trust and e.trust["unlike_training"]:
                    log.warning("%s: unlike the training data for the %s model(s) (percentile %.1f of the training "
                                "crops' own distances): treat the predictions with caution", pid, e.task,
                                e.trust["percentile"])
            if pc.padded_share > 0:
                log.warning("%s: the crop crosses the volume's edge; %.1f%% of it is padding (-1000 HU)",
                            pid, 100 * pc.padded_share)
            entry["files"]["report"] = write_report(entry, {**pc.crop, "padded": pc.padded}, arrays, folder, hashes,
                                                    series_label)
            write_json(folder / "predictions.json", entry)
            entries.append(entry)

    import pandas as pd

    table = pd.DataFrame(rows)
    atomic_write(out / "predictions.csv", lambda tmp: table.to_csv(tmp, index=False, lineterminator="\n"))
    summary = {"series": str(args.series), "volume": {"name": volume.name, "shape_zyx": list(volume.shape),
                                                       "spacing_xyz": list(volume.spacing),
                                                       "origin_xyz": list(volume.origin),
                                                       "series_instance_uid": volume.meta.get("series_instance_uid"),
                                                       "warning": volume.meta.get("warning")},
               "checkpoints": [str(c) for c in args.checkpoint], "method": args.method,
               "options": options, "slices": args.slices, "margin": args.margin,
               "maps_note": "raw signed scores of each crop slice, resized to the 1 mm crop plane, placed on the "
                            "scan's grid (linear), zero outside the crop; ensembles: the mean over the models",
               "points": entries,
               "reports": {e["id"]: {k: f"{e['id']}/{v}" for k, v in e["files"]["report"].items()} for e in entries}}
    if args.dicom:
        summary["dicom"] = write_dicom_results(volume, results, out)
    write_json(out / "summary.json", summary)
    print(f"explained {len(points)} point(s) with {n_models} checkpoint(s) ({len(groups)} task(s)); "
          f"results in {out}/")
    return summary
