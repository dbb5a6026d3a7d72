"""The `lidc-cdam` command: one sub-command per job."""

from __future__ import annotations

import argparse
import logging
import sys

JOBS = {
    "explain": ("lidc_cdam.pipelines.explain", "importance maps for image files"),
    "explain-ct": ("lidc_cdam.pipelines.explain_ct", "predictions and CDAM maps at points of any CT (DICOM, NIfTI), "
                                                     "fold ensembles; maps as NIfTI on the scan's grid"),
    "pacs": ("lidc_cdam.pipelines.pacs", "a PACS over DICOMweb: find studies and series (`explain-ct --dicomweb` "
                                         "fetches one and stores the results back)"),
    "benchmark": ("lidc_cdam.pipelines.benchmark", "evaluate importance estimators: tables and curves as in the paper"),
    "cohort": ("lidc_cdam.pipelines.cohort", "evaluate the maps over the LIDC test nodules of each fold: evidence in "
                                             "the nodule, faithfulness, radiological concepts, co-location"),
    "demo": ("lidc_cdam.pipelines.demo", "the embedded example: the shipped tiny ViTs explain LIDC phantom nodules "
                                         "(malignancy, eight biomarkers; not CT); --digits: two-digit images"),
    "imagenet-manifests": ("lidc_cdam.pipelines.imagenet_manifests",
                           "build the ImageNet X_val / X_multi manifests from ReaL labels"),
    "linear-probe": ("lidc_cdam.pipelines.linear_probe", "train the ImageNet linear probe on a frozen ViT backbone"),
    "preprocess": ("lidc_cdam.pipelines.preprocess", "LIDC-IDRI DICOM -> nodule crops, labels, biomarkers (pylidc)"),
    "phantoms": ("lidc_cdam.pipelines.phantoms", "offline LIDC-style nodules rendered from annotations (not CT)"),
    "train": ("lidc_cdam.pipelines.train", "fine-tune a ViT on LIDC nodules (malignancy or biomarkers), 5 folds"),
    "sweep": ("lidc_cdam.pipelines.sweep", "cross-validate every combination of a parameter grid"),
}


def package_version() -> str:
    """The installed distribution's version; when it is not installed (run from a source tree), the
    package's own ``lidc_cdam.__version__``; ``"unknown"`` when neither is there."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lidc-cdam")
    except PackageNotFoundError:
        try:
            from lidc_cdam import __version__
        except ImportError:
            return "unknown"
        return str(__version__)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="lidc-cdam",
        description="Class-discriminative attention maps (CDAM) for Vision Transformers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="job", required=True, metavar="JOB")
    for name, (module, help_text) in JOBS.items():
        job = importlib.import_module(module)
        job_parser = sub.add_parser(name, help=help_text, description=(job.__doc__ or "").strip())
        job.add_arguments(job_parser)
        job_parser.set_defaults(run=job.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv == ["--version"]:  # answered without importing every job
        print(f"lidc-cdam {package_version()}")
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if not args.verbose:  # highdicom logs each module it copies, dicomweb-client each request: only with -v
        for name in ("highdicom", "dicomweb_client"):
            logging.getLogger(name).setLevel(logging.WARNING)
    from lidc_cdam.data.imagenet import ManifestError
    from lidc_cdam.data.images import ImageReadError
    from lidc_cdam.data.lidc.errors import LidcError
    from lidc_cdam.device import DeviceError
    from lidc_cdam.evaluate.benchmark_config import ConfigError
    from lidc_cdam.explain.targets import TargetError
    from lidc_cdam.models.loading import CheckpointError
    from lidc_cdam.models.vit import ModelInputError
    from lidc_cdam.train.config import TrainConfigError

    try:
        args.run(args)
    except (CheckpointError, ConfigError, ImageReadError, TargetError, ModelInputError, LidcError,
            ManifestError, TrainConfigError, DeviceError) as err:
        print(f"lidc-cdam {args.job}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
