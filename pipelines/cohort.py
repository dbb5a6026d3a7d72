"""`lidc-cdam cohort --checkpoint ... --data DIR --out DIR`: evaluate the maps over the test nodules of each fold.

For every checkpoint (a path or a shipped name such as ``phantom-malignancy``) on the test fold it was trained
for, every target (its outputs and the radiological concepts of ``data_manifest/lidc_concepts.yaml``, Eq. 3-4,
from the fold's training nodules) and every method: the share of positive evidence in the consensus mask, a
3 mm ring and the background against a uniform map, the pointing game, MIF / LIF and box sensitivity with the
blur made in HU (sigma in mm), compactness, the correlation of the malignancy map with every other map, and
the cascading randomisation check; on phantoms (crops with ``cause_<target>`` regions) the ground-truth test of
each biomarker's map in its own cause region (``OUT/causes/`` or ``--causes-out``). Tidy tables
(``metrics.parquet`` / ``.csv``, ``correlations.*``), ``tables.md``, ``tables/*.csv`` and figures. Interrupted
runs resume (same ``--out``).
Example (phantoms, not CT): ``lidc-cdam cohort --checkpoint phantom-malignancy phantom-biomarkers
--data phantoms/ --out cohort/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lidc_cdam.device import add_device_argument

    parser.add_argument("--checkpoint", nargs="+", required=True, metavar="CKPT",
                        help="checkpoints (lidc-cdam train output) or shipped names (phantom-malignancy, "
                             "phantom-biomarkers); each is evaluated on the test fold it records")
    parser.add_argument("--data", type=Path, required=True,
                        help="output folder of `lidc-cdam preprocess` or `lidc-cdam phantoms`")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--folds", type=int, nargs="+", help="test folds (default: the checkpoints' folds)")
    parser.add_argument("--folds-table", type=Path, help="folds CSV (default: the committed lidc_folds.csv)")
    parser.add_argument("--method", nargs="+", default=["all"], metavar="METHOD",
                        help="methods (default all ten, with the offline benchmark's options)")
    parser.add_argument("--concept", nargs="*", default=None, metavar="NAME",
                        help="concepts to explain (e.g. spiculated round-contrast; default every defined concept "
                             "and contrast with enough training examples; give none to skip concepts)")
    parser.add_argument("--concepts-on", choices=("reference", "all"), default="reference",
                        help="explain the concepts on the reference model only (default) or on every model")
    parser.add_argument("--similarity", choices=("dot", "cosine", "neg_l2"), help="g of Eq. 4 (default: the YAML's)")
    parser.add_argument("--reference", default="malignant", help="output whose map the others are correlated with")
    parser.add_argument("--blur-mm", type=float, default=2.0, help="sigma of the HU blur baseline in mm (default 2)")
    parser.add_argument("--ring-mm", type=float, default=3.0, help="ring width around the mask in mm (default 3)")
    parser.add_argument("--n-boxes", type=int, default=100, help="boxes per side length (default 100)")
    parser.add_argument("--batch-nodules", type=int, default=16, help="nodules per part (default 16)")
    parser.add_argument("--randomization-nodules", type=int, default=16,
                        help="nodules of the randomisation check (0: skip)")
    parser.add_argument("--causes-out", type=Path,
                        help="folder of the cause-region report (default OUT/causes; phantoms only), e.g. "
                             "benchmarks/results/biomarker-causes")
    add_device_argument(parser)
    parser.add_argument("--restart", action="store_true", help="discard earlier results in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> dict | None:
    from lidc_cdam.evaluate.cohort import COHORT_METHODS, CohortError, CohortSettings, run_cohort

    methods = list(COHORT_METHODS) if args.method == ["all"] else list(dict.fromkeys(args.method))
    unknown = [m for m in methods if m not in COHORT_METHODS]
    if unknown:
        raise CohortError(f"unknown method(s) {unknown}; available: {', '.join(COHORT_METHODS)} or 'all'")
    settings = CohortSettings(
        methods={m: COHORT_METHODS[m] for m in methods}, blur_mm=args.blur_mm, ring_mm=args.ring_mm,
        n_boxes=args.n_boxes, batch_nodules=args.batch_nodules,
        concepts=None if args.concept is None else tuple(args.concept), concepts_on=args.concepts_on,
        similarity=args.similarity, reference=args.reference, randomization_nodules=args.randomization_nodules)
    summary = run_cohort(args.checkpoint, args.data, args.out, folds=args.folds, settings=settings,
                         folds_table=args.folds_table, restart=args.restart, device=args.device,
                         progress=not args.no_progress and sys.stderr.isatty(), causes_out=args.causes_out)
    if summary is not None:
        print((args.out / "tables.md").read_text())
        print(f"\nResults in {args.out}/ (metrics.csv, correlations.csv, tables.md, tables/, figures/)")
        if "causes" in summary:
            folder = args.causes_out or args.out / "causes"
            print(f"Cause regions: {folder}/ (tables.md, causes.csv, tables/, figures/)")
    return summary
