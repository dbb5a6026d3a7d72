"""The ground-truth test of per-target maps, its tables and figures, from a cohort run's metric rows (the cause
columns of :mod:`.cause_regions`; ``docs/method.md``, "Ground truth for per-target maps").

Written into one folder (``lidc-cdam cohort``: ``OUT/causes/``, or ``--causes-out``):

* ``causes.csv``: per nodule, model, target and method the cause columns, for targets whose cause region is
  non-empty on the nodule's plane;
* ``tables/causes.csv``: per model, target and method the mean ``share_cause`` with its 95 % percentile-bootstrap
  interval over nodules, the uniform map's share and the ratio to it, the pointing game with its interval,
  ``share_other`` beside the uniform map's, the discrimination with its interval beside the uniform map's, and
  ``abs_share_cause`` / ``abs_discrimination`` (evidence of either sign) with their intervals;
* ``tables/left_out.csv``: per model and target, the nodules with and without a cause region on their plane;
* ``tables.md``; ``figures/cause_maps.png`` (one row per target, one column per method, all on one nodule: the
  crop's plane in grey, the map over it, the cause region's outline), ``figures/discrimination.png``
  (discrimination per target and method, with intervals) and ``figures/abs_discrimination.png`` (the same with
  the evidence of either sign);
* ``settings.json`` (the run's settings and checkpoints, what a rerun needs) and ``summary.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lidc_cdam.data.lidc.phantom_causes import CAUSE_REGION
from lidc_cdam.evaluate.cause_regions import CAUSE_COLUMNS
from lidc_cdam.evaluate.cohort_report import N_BOOTSTRAP, bootstrap_ci
from lidc_cdam.evaluate.report import method_order
from lidc_cdam.io import atomic_write, write_json
from lidc_cdam.viz import save_figure

KEYS = ["fold", "nodule_id", "model", "target", "method"]


def has_causes(metrics: pd.DataFrame) -> bool:
    """Whether a run's metric rows hold any cause region (phantoms with ``cause_*`` masks)."""
    return "cause_pixels" in metrics and bool((metrics["cause_pixels"] > 0).any())


def cause_rows(metrics: pd.DataFrame) -> pd.DataFrame:
    """The rows of targets with a non-empty cause region, their keys and cause columns, and the region's kind."""
    if not has_causes(metrics):
        return pd.DataFrame(columns=[*KEYS, "cause_region", *CAUSE_COLUMNS])
    rows = metrics.loc[metrics["cause_pixels"] > 0, [*KEYS, *CAUSE_COLUMNS]].copy()
    rows.insert(4, "cause_region", rows["target"].map(CAUSE_REGION).fillna(""))
    return rows.reset_index(drop=True)


def left_out_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per model and target with a cause region in the crops: nodules with a non-empty region, and left out."""
    with_region = metrics[metrics["cause_pixels"].notna()] if "cause_pixels" in metrics else metrics.iloc[:0]
    rows = []
    for (model, target), g in with_region.groupby(["model", "target"], sort=False):
        per_nodule = g.groupby("nodule_id")["cause_pixels"].first()
        rows.append({"model": model, "target": target, "cause_region": CAUSE_REGION.get(target, ""),
                     "nodules": int((per_nodule > 0).sum()), "left_out": int((per_nodule == 0).sum())})
    return pd.DataFrame(rows, columns=["model", "target", "cause_region", "nodules", "left_out"])


def cause_table(rows: pd.DataFrame, targets: list[tuple[str, str]] | None = None) -> pd.DataFrame:
    """Per (model, target, method): means over nodules, 95 % bootstrap intervals, the uniform map's values;
    ``targets``: the (model, target) order (default: as they come in ``rows``)."""
    order = {m: i for i, m in enumerate(method_order(list(rows["method"].unique())))}
    out = []
    for (model, target, method), g in rows.groupby(["model", "target", "method"], sort=False):
        row: dict[str, Any] = {"model": model, "target": target, "cause_region": g["cause_region"].iloc[0],
                               "method": method, "n": len(g)}
        for column in ("share_cause", "pointing_cause", "discrimination", "abs_share_cause", "abs_discrimination"):
            values = g[column].to_numpy(float)
            lo, hi = bootstrap_ci(values)
            row.update({column: float(np.mean(values)), f"{column}_lo": lo, f"{column}_hi": hi})
            if column == "share_cause":
                row["uniform_cause"] = float(g["uniform_cause"].mean())
                row["cause_over_uniform"] = row["share_cause"] / row["uniform_cause"]
        row.update({"share_other": float(g["share_other"].mean()), "uniform_other": float(g["uniform_other"].mean()),
                    "uniform_discrimination": float(g["uniform_discrimination"].mean()),
                    "abs_share_other": float(g["abs_share_other"].mean())})
        out.append(row)
    frame = pd.DataFrame(out)
    if frame.empty:
        return frame
    pairs = list(dict.fromkeys([*(targets or []), *zip(rows["model"], rows["target"], strict=True)]))
    targets = {t: i for i, t in enumerate(pairs)}
    frame["_t"] = [targets[(m, t)] for m, t in zip(frame["model"], frame["target"], strict=True)]
    frame["_m"] = frame["method"].map(order)
    return frame.sort_values(["_t", "_m"]).drop(columns=["_t", "_m"]).reset_index(drop=True)


def example_nodule(rows: pd.DataFrame) -> str | None:
    """The nodule with a non-empty cause region for the most targets (ties: the first id)."""
    if rows.empty:
        return None
    counts = rows.groupby("nodule_id")["target"].nunique()
    return str(counts[counts == counts.max()].sort_index().index[0])


def _label(model: str, target: str, models: list[str]) -> str:
    region = CAUSE_REGION.get(target, "")
    name = target if len(models) == 1 else f"{model}: {target}"
    return f"{name} ({region})" if region else name


def _cell(mean: float, lo: float, hi: float) -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.2f} [{lo:.2f}, {hi:.2f}]" if np.isfinite(lo) else f"{mean:.2f}"


def _grid_md(table: pd.DataFrame, column: str, first: dict[str, str] | None = None) -> str:
    """A target x method Markdown table of ``mean [lo, hi]`` cells (optionally first columns of plain values)."""
    models = list(dict.fromkeys(table["model"]))
    methods = method_order(list(table["method"].unique()))
    first = first or {}
    header = "| target | " + " | ".join([*first.values(), *methods]) + " |"
    lines = [header, "|---|" + "---:|" * (len(first) + len(methods))]
    for (model, target), g in table.groupby(["model", "target"], sort=False):
        by_method = g.set_index("method")
        plain = [f"{g[c].iloc[0]:.2f}" for c in first]
        cells = [_cell(*by_method.loc[m, [column, f"{column}_lo", f"{column}_hi"]].to_numpy(float))
                 if m in by_method.index else "" for m in methods]
        lines.append(f"| {_label(model, target, models)} | " + " | ".join(plain + cells) + " |")
    return "\n".join(lines)


def discrimination_figure(table: pd.DataFrame, path: Path, title: str, column: str = "discrimination") -> Path:
    """Heat map of the mean ``column`` (``discrimination``, or ``abs_discrimination`` for the evidence of either
    sign) per target (rows) and method (columns), the uniform map's discrimination first, each cell annotated with
    its 95 % interval."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(table["model"]))
    methods = method_order(list(table["method"].unique()))
    groups = list(table.groupby(["model", "target"], sort=False))
    grid = np.full((len(groups), len(methods) + 1), np.nan)
    text = np.full(grid.shape, "", dtype=object)
    for i, ((_, _), g) in enumerate(groups):
        by_method = g.set_index("method")
        grid[i, 0] = g["uniform_discrimination"].iloc[0]
        text[i, 0] = f"{grid[i, 0]:.2f}"
        for j, m in enumerate(methods, start=1):
            if m in by_method.index:
                mean, lo, hi = by_method.loc[m, [column, f"{column}_lo", f"{column}_hi"]]
                grid[i, j] = mean
                text[i, j] = f"{mean:.2f}\n[{lo:.2f}, {hi:.2f}]" if np.isfinite(lo) else f"{mean:.2f}"
    fig, ax = plt.subplots(figsize=(1.6 + 0.85 * grid.shape[1], 1.2 + 0.5 * grid.shape[0]), constrained_layout=True)
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            ax.text(j, i, text[i, j], ha="center", va="center", fontsize=5.5,
                    color="white" if abs(v) > 0.6 else "black")
    ax.axvline(0.5, color="k", lw=1)
    ax.set_xticks(range(grid.shape[1]), ["uniform map", *methods], rotation=90, fontsize=7)
    ax.set_yticks(range(grid.shape[0]), [_label(m, t, models) for (m, t), _ in groups], fontsize=7)
    what = "of either sign, " if column.startswith("abs_") else ""
    fig.colorbar(image, ax=ax, label=f"discrimination ({what}own region - other regions)")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def cause_maps_figure(example: dict[str, Any], rows: pd.DataFrame, path: Path, title: str) -> Path:
    """One row per target with a cause region in the crop, one column per method, all on ``example``'s nodule
    (:func:`~lidc_cdam.evaluate.cohort_compute.cause_example`): the crop's plane in grey, the map over it (red
    positive, blue negative, each map scaled to its largest magnitude), the cause region's outline in green and
    ``share_cause`` / ``discrimination`` of that map."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = [(name, t, k) for name, entry in example["models"].items()
              for k, t in enumerate(entry["targets"]) if t in example["causes"]]
    methods = method_order(list(next(iter(example["models"].values()))["maps"]))
    models = list(example["models"])
    here = rows[rows["nodule_id"] == example["nodule_id"]].set_index(["model", "target", "method"])
    hu = example["hu"]
    h, w = hu.shape
    extent = (-0.5, w - 0.5, h - 0.5, -0.5)
    fig, axes = plt.subplots(len(panels), len(methods), figsize=(1.25 * len(methods) + 1.0, 1.3 * len(panels) + 0.6),
                             squeeze=False, constrained_layout=True)
    for i, (model, target, k) in enumerate(panels):
        region = example["causes"][target]
        for j, method in enumerate(methods):
            ax = axes[i, j]
            ax.imshow(hu, cmap="gray", vmin=-1000, vmax=400, extent=extent)
            s = example["models"][model]["maps"][method][k]
            scale = float(np.abs(s).max()) or 1.0
            ax.imshow(s / scale, cmap="RdBu_r", vmin=-1, vmax=1, alpha=0.55, extent=extent, interpolation="nearest")
            if region.any():
                ax.contour(region.astype(float), levels=[0.5], colors="lime", linewidths=0.8)
            key = (model, target, method)
            if key in here.index:
                r = here.loc[key]
                ax.text(0.5, 30.5, f"{r['share_cause']:.2f} / {r['discrimination']:+.2f}", color="yellow",
                        fontsize=5.5, va="bottom")
            elif not region.any():
                ax.text(0.5, 30.5, "no region here", color="yellow", fontsize=5.5, va="bottom")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(method, fontsize=7)
            if j == 0:
                ax.set_ylabel(_label(model, target, models), fontsize=7)
    fig.suptitle(f"{title}\n{example['nodule_id']}; green: the cause region;\nyellow: share in it / discrimination",
                 fontsize=8)
    return save_figure(fig, path)


def write_cause_report(folder: Path, metrics: pd.DataFrame, run: dict[str, Any],
                       example: dict[str, Any] | None = None) -> dict[str, Any]:
    """The folder's tables, figures and ``summary.json`` (module docstring); returns the summary."""
    folder = Path(folder)
    note = run.get("note", "")
    rows = cause_rows(metrics)
    left = left_out_table(metrics)
    table = cause_table(rows, list(zip(left["model"], left["target"], strict=True)))
    atomic_write(folder / "causes.csv", lambda tmp: rows.to_csv(tmp, index=False))
    for name, frame in (("causes", table), ("left_out", left)):
        atomic_write(folder / "tables" / f"{name}.csv", lambda tmp, f=frame: f.to_csv(tmp, index=False))
    write_json(folder / "settings.json", {k: run[k] for k in ("settings", "folds") if k in run} |
               {"checkpoints": [{k: c.get(k) for k in ("name", "sha256", "fold")} for c in run.get("checkpoints", [])]})
    summary: dict[str, Any] = {"note": note, "nodules": int(rows["nodule_id"].nunique()), "figures": [],
                               "example_nodule": example["nodule_id"] if example else None}
    lines = [f"# Ground truth for per-target maps ({note})", "",
             "Per target, the share of each map's positive evidence in the target's own rendered cause region "
             "(`share_cause`) against a uniform map (the region's area), the pointing game on the region, and the "
             "discrimination: the share in the own region minus the share in the other targets' regions (their union "
             "minus the own region). Means over the nodules whose plane holds the region, 95 % percentile "
             f"bootstrap intervals ({N_BOOTSTRAP} resamples).", ""]
    if table.empty:
        lines.append("No cause regions in these crops (CT crops have none): nothing to measure.")
    else:
        lines += ["## Nodules per target", "", "| target | region | nodules | left out (empty region) |",
                  "|---|---|---:|---:|"]
        lines += [f"| {r.target} | {r.cause_region} | {r.nodules} | {r.left_out} |" for r in left.itertuples()]
        lines += ["", "## Discrimination (own region - other targets' regions)", "",
                  _grid_md(table, "discrimination", {"uniform_discrimination": "uniform map"}), "",
                  "![discrimination](figures/discrimination.png)", "",
                  "## Share of positive evidence in the own cause region", "",
                  _grid_md(table, "share_cause", {"uniform_cause": "uniform map"}), "",
                  "## Pointing game on the own cause region", "", _grid_md(table, "pointing_cause"), "",
                  "## Evidence of either sign", "",
                  "A cause that lowers the rating (a calcified core, a blurred edge) draws negative evidence, which "
                  "the positive share cannot credit. The same measures of `|S|`: its share in the own region, and "
                  "the discrimination (the uniform map's values are those above).", "",
                  "### Discrimination of `|S|`", "",
                  _grid_md(table, "abs_discrimination", {"uniform_discrimination": "uniform map"}), "",
                  "![discrimination of either sign](figures/abs_discrimination.png)", "",
                  "### Share of `|S|` in the own cause region", "",
                  _grid_md(table, "abs_share_cause", {"uniform_cause": "uniform map"}), ""]
        for column, what in (("discrimination", "Discrimination"), ("abs_discrimination", "Discrimination of |S|")):
            fig = discrimination_figure(table, folder / "figures" / f"{column}.png",
                                        f"{what} per target and method\n({note}; 95 % bootstrap intervals)", column)
            summary["figures"].append(str(fig.relative_to(folder)))
        if example is not None:
            fig = cause_maps_figure(example, rows, folder / "figures" / "cause_maps.png",
                                    f"Per-target maps and cause regions ({note})")
            summary["figures"].append(str(fig.relative_to(folder)))
            lines += ["![maps on one nodule](figures/cause_maps.png)", ""]
        summary["cdam"] = {r.target: {"share_cause": r.share_cause, "uniform_cause": r.uniform_cause,
                                      "pointing_cause": r.pointing_cause, "discrimination": r.discrimination,
                                      "abs_share_cause": r.abs_share_cause, "abs_discrimination": r.abs_discrimination}
                           for r in table[table["method"] == "cdam"].itertuples()}
    atomic_write(folder / "tables.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    write_json(folder / "summary.json", summary)
    return summary
