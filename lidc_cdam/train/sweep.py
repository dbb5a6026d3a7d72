"""Parameter sweeps (paper A.5.2: trainable layers, dropout, batch size, schedule): every
combination of a grid runs the 5-fold cross-validation; one results table ranks them.

A grid maps config keys (dotted, as ``--set``) to lists of values, e.g.::

    trainable_blocks: [2, 4, null]
    backbone.drop_rate: [0.0, 0.06, 0.12]
    batch_size: [8, 16, 32]
    schedule.type: [exponential, cyclic]
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from lidc_cdam.config_overrides import apply_override
from lidc_cdam.io import atomic_write
from lidc_cdam.train.config import TrainConfig, TrainConfigError, config_from_dict
from lidc_cdam.train.cross_validation import run_cross_validation
from lidc_cdam.train.engine import FoldData


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in a fixed order."""
    if not grid:
        raise TrainConfigError("the sweep grid is empty")
    keys = list(grid)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise TrainConfigError(f"sweep grid: {key} needs a non-empty list of values")
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def point_name(point: dict[str, Any]) -> str:
    return "_".join(f"{k.split('.')[-1]}={v}" for k, v in point.items()).replace("/", "-")


def sweep_configs(base: TrainConfig, grid: dict[str, list[Any]]) -> list[tuple[dict[str, Any], TrainConfig]]:
    """The configs of a sweep (each checked like a config file)."""
    configs = []
    for point in grid_points(grid):
        data = base.to_dict()
        data.pop("source_file")
        for key, value in point.items():
            apply_override(data, f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}",
                           base.source_file, TrainConfigError)
        data["name"] = f"{base.name}[{point_name(point)}]"
        configs.append((point, config_from_dict(data, base.source_file)))
    return configs


def run_sweep(base: TrainConfig, grid: dict[str, list[Any]], out: str | Path,
              make_fold_data: Callable[[TrainConfig, int], FoldData], *, progress: bool = True) -> pd.DataFrame:
    """Cross-validate every grid point into ``out/<point>/``; write ``out/sweep.csv`` and
    ``sweep.md`` sorted by the key metric (mean over folds)."""
    out = Path(out)
    rows = []
    for point, config in sweep_configs(base, grid):
        per_fold = run_cross_validation(config, out / point_name(point), lambda f, c=config: make_fold_data(c, f),
                                        progress=progress)
        if per_fold is None:
            continue
        mine = per_fold[per_fold["model"] == config.name]
        metrics = {c: mine[c].mean() for c in ("accuracy", "auc", "mse") if c in mine}
        rows.append({**point, **metrics, "folds": len(mine), "seconds_per_epoch": mine["seconds_per_epoch"].mean()})
    table = pd.DataFrame(rows)
    key, ascending = ("auc", False) if "auc" in table else ("mse", True)
    table = table.sort_values(key, ascending=ascending, kind="stable").reset_index(drop=True)
    atomic_write(out / "sweep.csv", lambda tmp: table.to_csv(tmp, index=False))
    atomic_write(out / "sweep.md", lambda tmp: tmp.write_text(_markdown(base, table, key)))
    return table


def _markdown(base: TrainConfig, table: pd.DataFrame, key: str) -> str:
    columns = list(table.columns)
    lines = [f"# Sweep over {base.name} (sorted by mean {key} over folds)", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"
