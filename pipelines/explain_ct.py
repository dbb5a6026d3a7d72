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
                                  1 mm grid, in the patient's axes (LPS) whatever the file's voxel order
  POINT/report.png, report.pdf    a report page: the crop, each target's map over it, the predictions and
                                  their spread, the trust flag, warnings, the models' SHA-256; research use only
  POINT/dicom/                    with --dicom: each map as a Parametric Map, the crop as a Segmentation (on
                                  the crop's own 1 mm grid, the source's Frame of Reference)
  dicom_sr.dcm                    with --dicom: a TID 1500 Structured Report of every point
  manifest.json                   what the run wrote, per point, and the settings it used

Every file is written atomically and each point's folder appears whole or not at all. Rerunning into the same
--out resumes: points finished with the same settings are skipped, point folders of an earlier run that this
run does not have are removed (and said so). The NIfTI files carry the scan's geometry: they open aligned with
the CT in 3D Slicer or ITK-SNAP. All the work is done by lidc_cdam.ct.outputs.explain_points.

From a PACS: --dicomweb URL --study UID [--series UID] instead of SERIES fetches the series (default: the study's
largest CT series) by WADO-RS into the lidc-cdam cache (fetched once; an interrupted fetch resumes). --store sends
the DICOM results (--dicom) back to that server by STOW-RS, --store-to URL to another, --store-scp AET@HOST:PORT by
DIMSE C-STORE; pacs_store.json records what was stored where. A server that is down, times out or refuses: exit 2,
saying what was and was not stored (the local results stay). Credentials: LIDC_CDAM_PACS_TOKEN, or
LIDC_CDAM_PACS_USER / LIDC_CDAM_PACS_PASSWORD, or netrc; never on the command line. Library: lidc_cdam.ct.pacs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
from lidc_cdam.pipelines.pacs import add_connection_arguments
from tqdm.auto import tqdm

from lidc_cdam.ct import read as ct_read  # read_ct and connect looked up at the call: the tests replace them
from lidc_cdam.ct.checkpoint import MALIGNANCY
from lidc_cdam.ct.concepts import ConceptResolver
from lidc_cdam.ct.errors import CTError
from lidc_cdam.ct.outputs import explain_points
from lidc_cdam.ct.pacs import client as pacs_client
from lidc_cdam.ct.pacs.fetch import fetch_series
from lidc_cdam.ct.pacs.store import parse_scp, send_results
from lidc_cdam.ct.run_folder import RunFolder, point_ids
from lidc_cdam.data.lidc.nodules import BIOMARKERS
from lidc_cdam.device import add_device_argument, resolve_device

METHOD_CHOICES = ("cdam", "smooth-cdam", "integrated-cdam", "attention")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("series", type=Path, nargs="?",
                        help="a CT: DICOM series folder (or a patient folder above it), a DICOM file of the series, "
                             "or a NIfTI, NRRD or MHA/MHD file (or, instead, --dicomweb with --study)")
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

    add_device_argument(parser)
    parser.add_argument("--dicom", action="store_true",
                        help="also write DICOM results for a PACS (DICOM input only): each CDAM as a Parametric Map, "
                             "the explained region as a Segmentation, the predictions as a TID 1500 SR")
    pacs = parser.add_argument_group("PACS", "fetch the CT from a DICOMweb server and store the DICOM results on a "
                                     "PACS (credentials from the environment or netrc: `lidc-cdam pacs find -h`)")
    add_connection_arguments(pacs, required=False)
    pacs.add_argument("--study", metavar="UID", help="with --dicomweb: the StudyInstanceUID to fetch")
    pacs.add_argument("--series", dest="pacs_series", metavar="UID",
                      help="with --dicomweb: the SeriesInstanceUID (default: the study's largest CT series)")
    pacs.add_argument("--store", action="store_true",
                      help="store the DICOM results (--dicom) on the --dicomweb server (STOW-RS)")
    pacs.add_argument("--store-to", dest="store_to", action="append", default=[], metavar="URL",
                      help="store the DICOM results on this DICOMweb server (STOW-RS); repeatable")
    pacs.add_argument("--store-scp", dest="store_scp", action="append", default=[], metavar="AET@HOST:PORT",
                      help="store the DICOM results by DIMSE C-STORE (a PACS without DICOMweb); repeatable")


# ------------------------------------------------------------------------------------------ points


def rating_columns() -> list[str]:
    """Columns of a points CSV read as the radiologists' ratings: the targets' names."""
    return [MALIGNANCY, *BIOMARKERS]


def read_points(args: argparse.Namespace) -> tuple[list[tuple[str, tuple[float, ...]]], dict[str, dict[str, float]]]:
    """``([(id, (3 numbers))], {id: {target: rating}})`` from --point or --points; :class:`CTError` for a bad CSV or
    ids that collide (:func:`lidc_cdam.ct.run_folder.point_ids`)."""
    if args.point:
        return [(f"p{n + 1:02d}", tuple(p)) for n, p in enumerate(args.point)], {}
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
    raw = frame["id"].tolist() if "id" in frame.columns else [None] * len(frame)
    raw = [None if r is None or (isinstance(r, float) and np.isnan(r)) else r for r in raw]
    try:
        ids = point_ids(raw)
    except CTError as err:
        raise CTError(f"{path}: {err}") from None
    points = [(pid, tuple(float(v) for v in row)) for pid, row in zip(ids, values.to_numpy(dtype=float), strict=True)]
    ratings: dict[str, dict[str, float]] = {}
    given = [c for c in rating_columns() if c in frame.columns]
    if given:
        table = frame[given].apply(pd.to_numeric, errors="coerce")
        for n, pid in enumerate(ids):
            known = {c: float(v) for c, v in table.iloc[n].items() if np.isfinite(v)}
            if known:
                ratings[pid] = known
    return points, ratings


# ------------------------------------------------------------------------------------------ run


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.n < 1 or args.margin < 0:
        raise CTError("--n must be >= 1 and --margin >= 0")
    device = resolve_device(args.device)  # an unavailable device stops here
    check_pacs_arguments(args)
    RunFolder(args.out, {})  # an unusable --out stops here, before any reading or computing
    points, ratings = read_points(args)
    concepts = ConceptResolver(args.concept, args.concept_data)
    stow, scp = destinations(args)
    source: dict[str, Any] = {"series": str(args.series)}
    if args.dicomweb:
        path, source = fetch(stow[0] if args.store else None, args)
        series = None
    else:
        path = args.series
        series = int(args.series_uid) if args.series_uid and args.series_uid.isdigit() else args.series_uid
    volume = ct_read.read_ct(path, series)
    options = {"n": args.n} if args.method in ("smooth-cdam", "integrated-cdam") else {}
    where = source["series"]
    label = f"{volume.name} ({where})" if volume.name and volume.name != where else where
    with tqdm(total=1000, desc="explaining points", disable=not sys.stderr.isatty(),
              bar_format="{l_bar}{bar}| {elapsed}<{remaining}") as bar:

        def progress(done: int, total: int) -> None:
            bar.n = int(1000 * done / max(total, 1))
            bar.refresh()

        summary = explain_points(volume, points, args.checkpoint, args.out, ijk=args.ijk, method=args.method,
                                 view=args.view, slices="nodule" if args.slices == "centre" else "all",
                                 margin=args.margin, options=options, concepts=concepts, ratings=ratings,
                                 dicom=args.dicom, series_label=label, source=source,
                                 warn=lambda m: tqdm.write(f"warning: {m}", file=sys.stderr), progress=progress,
                                 device=device)
    n_models = len(summary["checkpoints"])
    resumed = f", {len(summary['resumed'])} resumed from an earlier run" if summary["resumed"] else ""
    print(f"explained {len(points)} point(s) with {n_models} checkpoint(s){resumed}; results in {args.out}/")
    if stow or scp:
        for report in send_results(args.out, summary=summary, stow=stow, scp=scp, timeout=args.pacs_timeout):
            print(f"stored on {report.line()}")
    return summary


# ------------------------------------------------------------------------------------------ PACS


def check_pacs_arguments(args: argparse.Namespace) -> None:
    """Exactly one of SERIES and --dicomweb; the PACS options only where they mean something."""
    if (args.series is None) == (args.dicomweb is None):
        both = args.series is not None
        raise CTError(f"{'two CTs' if both else 'no CT'}: give SERIES (a folder or file) or --dicomweb URL --study "
                      f"UID{', not both' if both else ''}")
    if args.dicomweb and not args.study:
        raise CTError("--dicomweb needs --study UID (find it with `lidc-cdam pacs find --dicomweb URL`)")
    if not args.dicomweb and (args.study or args.pacs_series):
        raise CTError("--study and --series go with --dicomweb (a folder's series: --series-uid)")
    if args.dicomweb and args.series_uid:
        raise CTError("--series-uid chooses a series in a folder; with --dicomweb use --series UID")
    if args.store and not args.dicomweb:
        raise CTError("--store sends the results to the --dicomweb server; give another server with --store-to URL "
                      "or --store-scp AET@HOST:PORT")
    if (args.store or args.store_to or args.store_scp) and not args.dicom:
        raise CTError("--store, --store-to and --store-scp send the DICOM results: add --dicom")


def destinations(args: argparse.Namespace) -> tuple[list[Any], list[str]]:
    """The DICOMweb servers (the --dicomweb one first with --store) and DIMSE targets the results go to; nothing is
    contacted yet, but malformed URLs and targets are refused before any work."""
    urls = ([args.dicomweb] if args.store else []) + list(args.store_to)
    stow = [pacs_client.connect(url, insecure=args.insecure, timeout=args.pacs_timeout) for url in urls]
    for target in args.store_scp:
        parse_scp(target)
    return stow, list(args.store_scp)


def fetch(server: Any, args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """The --study / --series fetched into the cache (or found there): its folder and the summary's source."""
    server = server or pacs_client.connect(args.dicomweb, insecure=args.insecure, timeout=args.pacs_timeout)
    with tqdm(desc="fetching the series", unit="instance", disable=not sys.stderr.isatty()) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        got = fetch_series(server, args.study, args.pacs_series, progress=progress)
    if got.from_cache:
        print(f"series {got.series}: {got.instances} instances from the cache ({got.folder})")
    else:
        print(f"fetched {got.downloaded} of {got.instances} instances of series {got.series} from {server.url} "
              f"({got.bytes / 1e6:.1f} MB in {got.seconds:.1f} s) into {got.folder}")
    return got.folder, got.as_source()
