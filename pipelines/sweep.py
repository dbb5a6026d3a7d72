"""`lidc-cdam sweep --config FILE --grid GRID.yaml`: cross-validate every combination of a grid.

The grid maps config keys (as ``--set`` takes them) to lists of values, e.g. ``trainable_blocks:
[2, 4, null]``, ``backbone.drop_rate: [0.0, 0.06]``, ``batch_size: [8, 16, 32]``, ``schedule.type:
[exponential, cyclic]`` (the paper's A.5.2 sweep). Results: ``sweep.csv`` / ``sweep.md`` ranked by
the mean test metric over folds (AUC or MSE), and every point's own 5-fold folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lidc_cdam.pipelines.train import add_arguments as add_train_arguments
from lidc_cdam.pipelines.train import load_cli_config

from lidc_cdam.train.config import TrainConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_train_arguments(parser)
    parser.add_argument("--grid", type=Path, help="YAML mapping of config keys to lists of values")
    parser.add_argument("--vary", action="append", default=[], metavar="KEY=[V1,V2]",
                        help="one grid axis, e.g. --vary batch_size=[8,16] (repeatable)")


def run(args: argparse.Namespace):
    import yaml

    from lidc_cdam.train.lidc_data import lidc_fold_data
    from lidc_cdam.train.sweep import run_sweep

    config = load_cli_config(args)
    grid = yaml.safe_load(args.grid.read_text()) if args.grid else {}
    for axis in args.vary:
        key, _, values = axis.partition("=")
        grid[key.strip()] = yaml.safe_load(values)
    if not isinstance(grid, dict) or not grid:
        raise TrainConfigError("give the sweep grid with --grid FILE or --vary KEY=[...]")
    out = args.out or Path("runs") / "sweep" / config.name
    table = run_sweep(config, grid, out, lidc_fold_data, progress=not args.no_progress and sys.stderr.isatty())
    print((out / "sweep.md").read_text())
    return table
