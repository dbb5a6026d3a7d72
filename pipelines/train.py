"""`lidc-cdam train --config FILE [--folds 0-4]`: fine-tune a ViT backbone on LIDC nodules.

Malignancy (binary, BCE) or the eight biomarkers (regression, Huber or MSE) on each of the five
folds (test = the fold, validation = the next one, training = the rest) with MONAI's engines; per
fold the best checkpoint by validation (``fold<k>/best.pt``, loadable by ``explain``, the viewer and
the benchmark), its history and test predictions; then ``summary.md`` / ``summary.csv`` (mean +- sd
over folds, next to a diameter threshold and a logistic regression on the biomarkers) and the
learning curves. Interrupted runs resume (same ``--out``). Under ``torchrun --nproc_per_node N``
the same command trains with DDP. Presets: ``pipelines/configs/train/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lidc_cdam.device import add_device_argument
from lidc_cdam.resources import config_dir
from lidc_cdam.train.config import load_train_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    presets = sorted(p.stem for p in config_dir("train").glob("*.yaml"))
    parser.add_argument("--config", required=True, help=f"a YAML file or a preset ({', '.join(presets)})")
    parser.add_argument("--folds", help="which folds, e.g. 0-4 or 0,2 (default: the config's)")
    parser.add_argument("--data", help="the preprocessed or phantom folder (overrides data.root)")
    parser.add_argument("--out", type=Path, help="output folder (default: runs/train/<config name>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config value, e.g. --set epochs=10 --set backbone.checkpoint=dino.pth")
    parser.add_argument("--restart", action="store_true", help="discard earlier results in --out")
    parser.add_argument("--no-progress", action="store_true")
    add_device_argument(parser)


def resolve_config_path(name: str) -> Path:
    path = Path(name)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path

    return config_dir("train") / f"{name}.yaml"


def load_cli_config(args: argparse.Namespace):
    overrides = list(args.overrides)
    if args.folds:
        overrides.append(f"folds={args.folds!r}")
    if args.data:
        overrides.append(f"data.root={args.data}")
    return load_train_config(resolve_config_path(args.config), overrides)


def run(args: argparse.Namespace):
    import shutil

    from lidc_cdam.train.cross_validation import run_cross_validation
    from lidc_cdam.train.engine import current_process
    from lidc_cdam.train.lidc_data import fold_split, lidc_fold_data, nodule_table

    config = load_cli_config(args)
    out = args.out or Path("runs") / "train" / config.name
    if args.restart and out.exists():
        shutil.rmtree(out)
    per_fold = run_cross_validation(config, out, lambda fold: lidc_fold_data(config, fold), nodule_table(config),
                                    lambda fold: fold_split(config, fold),
                                    progress=not args.no_progress and sys.stderr.isatty(),
                                    process=current_process(args.device))
    if per_fold is not None:
        print((out / "summary.md").read_text())
        print(f"Checkpoints: {out}/fold<k>/best.pt; learning curves: {out}/learning_curves.png")
    return per_fold
