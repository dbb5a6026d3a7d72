"""Tables (Markdown + CSV, in the paper's layout) and curve plots from a benchmark's tidy tables.

Per image set: fidelity and box sensitivity (paper Table 1 on X_multi, Table S1 on X_val: A_MIF,
A_LIF, A_LIF-MIF, A_box), class discrimination (Table 2: A_Delta(LIF-MIF), A_Delta box; sets with
a second class only), compactness (Table 3), localisation against object masks (sets with masks),
seconds per image; and the model-randomisation check. Figures: mean MIF / LIF curves and their
difference (Fig. S2 / S7), f_box (S3 / S6), the class-discrimination differences (S4 / S5).

Comparison with the paper (:mod:`lidc_cdam.evaluate.paper_tables`): every run reports the rank agreement
(Spearman) of its method ordering with the paper's, per metric of each table an image set maps to a
paper table (``paper_tables``), in ``tables.md`` and ``tables/rank_agreement.csv``; a config marked
``paper_setting: true`` also shows the paper's values beside the measured ones with the difference
(measured - paper), and writes ``tables/<set>_<table>_vs_paper.csv``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lidc_cdam.evaluate import paper_tables as pt
from lidc_cdam.evaluate.benchmark_config import PAPER_METHOD_ORDER, BenchmarkConfig
from lidc_cdam.io import atomic_write, write_json
from lidc_cdam.viz import save_figure

#: table name -> [(metrics column, header)]; arrows say which direction is better
TABLES: dict[str, list[tuple[str, str]]] = {
    "fidelity": [("a_mif", "A_MIF ↓"), ("a_lif", "A_LIF ↑"), ("a_lif_mif", "A_LIF-MIF ↑"), ("a_box", "A_box ↑")],
    "class_discrimination": [("delta_a_lif_mif", "A_Δ(LIF-MIF) ↑"), ("delta_a_box", "A_Δbox ↑")],
    "compactness": [("compactness", "Compactness ↑")],
    "localisation": [("share_in_own_mask", "positive share on own object ↑"),
                     ("share_in_other_mask", "positive share on other object ↓"),
                     ("pointing_hit", "pointing game ↑")],
    "timing": [("explain_seconds", "s / image (explain)")],
}
TITLES = {
    "fidelity": "Fidelity (MIF/LIF perturbation) and box sensitivity",
    "class_discrimination": "Class discrimination",
    "compactness": "Compactness: share of scores <= 5 % of the maximum",
    "localisation": "Localisation against the object masks (map explaining c1)",
    "timing": "Explanation time",
}


def method_order(methods: list[str]) -> list[str]:
    return [m for m in PAPER_METHOD_ORDER if m in methods] + sorted(set(methods) - set(PAPER_METHOD_ORDER))


def _format(value: float) -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def markdown_table(frame: pd.DataFrame, index_name: str = "method") -> str:
    """A Markdown table of a numeric frame (index: methods)."""
    header = f"| {index_name} | " + " | ".join(frame.columns) + " |"
    rule = "|---|" + "---:|" * len(frame.columns)
    lines = [header, rule]
    for name, row in frame.iterrows():
        lines.append(f"| {name} | " + " | ".join(_format(v) for v in row.to_numpy(dtype=float)) + " |")
    return "\n".join(lines)


def summary_table(metrics: pd.DataFrame, table: str) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """Means (for Markdown) and mean / sem / n per column (for CSV) of one table, methods as rows;
    ``None`` when the set has none of the table's values."""
    columns = [(c, h) for c, h in TABLES[table] if c in metrics and metrics[c].notna().any()]
    if not columns:
        return None
    grouped = metrics.groupby("method")
    order = method_order(list(grouped.groups))
    means = pd.DataFrame({h: grouped[c].mean() for c, h in columns}).loc[order]
    stats = pd.concat({h: grouped[c].agg(["mean", "sem", "count"]) for c, h in columns}, axis=1).loc[order]
    stats.columns = [f"{h} {s}" for h, s in stats.columns]
    return means, stats


def randomization_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Spearman and SSIM per method (rows) and randomisation stage (columns), and the verdict."""
    order = method_order(list(frame["method"].unique()))
    stages = list(dict.fromkeys(frame["stage"]))
    table = pd.DataFrame(index=order)
    for stage in stages:
        part = frame[frame["stage"] == stage].set_index("method")
        table[f"Spearman ({stage})"] = part["spearman"]
        table[f"SSIM ({stage})"] = part["ssim"]
    return table


def randomization_verdicts(frame: pd.DataFrame) -> dict[str, str]:
    verdicts = {}
    for method, rows in frame.groupby("method"):
        verdicts[method] = "passes" if bool(rows["changed"].all()) else (
            "fails (unchanged after: " + ", ".join(rows.loc[~rows["changed"].astype(bool), "stage"]) + ")")
    return verdicts


def write_report(config: BenchmarkConfig, out: Path, metrics: pd.DataFrame, curves: pd.DataFrame,
                 skipped: pd.DataFrame, randomization: pd.DataFrame | None) -> dict[str, Any]:
    """Write ``tables.md``, ``tables/*.csv`` and ``figures/*.png``; return the summary (also
    written to ``summary.json``)."""
    lines = [f"# Benchmark `{config.name}`", "",
             f"Config: `{_shown_path(config.source_file)}`; methods: {', '.join(method_order(list(config.methods)))}.",
             "Areas: MIF / LIF in output x percent of pixels perturbed (0-95 %), box sensitivity in patch "
             "units; means over images (standard errors in the CSV files).", ""]
    setting = pt.is_paper_setting(config)
    try:
        paper_frame = pt.load_paper_tables()
    except FileNotFoundError as err:  # an installation without the manifests: report without the paper
        paper_frame, missing_paper = pd.DataFrame(columns=list(pt.COLUMNS)), str(err)
    else:
        missing_paper = ""
    lines += ["Paper setting (`paper_setting: true`): the paper's values are shown beside the measured ones, "
              "Δ = measured - paper." if setting else
              "Not the paper's setting: the paper's values are not shown; only the ordering of the methods is "
              "compared with the paper's (rank agreement, at the end).", ""]
    summary: dict[str, Any] = {"name": config.name, "config": _shown_path(config.source_file), "image_sets": {},
                               "paper_setting": setting}
    rank_rows: list[dict[str, Any]] = []
    for spec in config.image_sets:
        rows = metrics[metrics["image_set"] == spec.name] if len(metrics) else metrics
        n_images = int(rows["image_id"].nunique()) if len(rows) else 0
        n_skipped = int((skipped["image_set"] == spec.name).sum()) if len(skipped) else 0
        lines += [f"## {spec.label or spec.name}", "",
                  f"{n_images} images" + (f", {n_skipped} skipped (see skipped.csv)" if n_skipped else "") + ".", ""]
        set_summary: dict[str, Any] = {"images": n_images, "skipped": n_skipped, "tables": {}, "figures": []}
        if not n_images:
            summary["image_sets"][spec.name] = set_summary
            continue
        for table in TABLES:
            made = summary_table(rows, table)
            if made is None:
                continue
            means, stats = made
            csv = out / "tables" / f"{spec.name}_{table}.csv"
            atomic_write(csv, lambda tmp, s=stats: s.to_csv(tmp, index_label="method"))
            paper = spec.paper_tables.get(table)
            lines += [f"### {TITLES[table]}" + (f" (paper {paper})" if paper else ""), "", markdown_table(means), ""]
            set_summary["tables"][table] = {m: {k: float(v) for k, v in r.items()} for m, r in means.iterrows()}
            if paper:
                lines += _paper_lines(out, spec.name, table, paper, rows, paper_frame, setting, rank_rows,
                                      set_summary)
        set_curves = curves[curves["image_set"] == spec.name]
        for fig_path in plot_curves(set_curves, out / "figures", spec.name, spec.label or spec.name):
            lines += [f"![{fig_path.stem}](figures/{fig_path.name})", ""]
            set_summary["figures"].append(str(fig_path))
        summary["image_sets"][spec.name] = set_summary
    rank = pd.DataFrame(rank_rows, columns=list(pt.RANK_COLUMNS))
    atomic_write(out / "tables" / "rank_agreement.csv", lambda tmp: rank.to_csv(tmp, index=False))
    lines += ["## Rank agreement with the paper", "",
              "Spearman's ρ between the measured means and the paper's values, per metric, over the methods in "
              "both (it compares the orderings of the values: +1 is the paper's order, whichever direction is "
              f"better); n/a with fewer than {pt.MIN_METHODS} methods or a constant column. Also in "
              "`tables/rank_agreement.csv`.", "",
              pt.rank_markdown(rank) if len(rank) else "No image set maps a table to one of the paper's.", ""]
    if missing_paper:
        lines += [f"(The paper's values are not available: {missing_paper}.)", ""]
    summary["rank_agreement"] = pt.records(rank)
    if randomization is not None and len(randomization):
        table = randomization_table(randomization)
        atomic_write(out / "tables" / "randomization.csv", lambda tmp: table.to_csv(tmp, index_label="method"))
        verdicts = randomization_verdicts(randomization)
        lines += ["## Model-randomisation check (cascading: head, then the last blocks)", "",
                  "Similarity of each method's maps to those of the trained model; a method passes when its maps "
                  "change (Spearman < 0.9) at every stage.", "", markdown_table(table), "",
                  *[f"- {m}: {verdicts[m]}" for m in method_order(list(verdicts))], ""]
        summary["randomization"] = verdicts
    atomic_write(out / "tables.md", lambda tmp: tmp.write_text("\n".join(lines)))
    summary["tables_md"] = str(out / "tables.md")
    write_json(out / "summary.json", summary)
    return summary


def _paper_lines(out: Path, set_name: str, table: str, paper: str, rows: pd.DataFrame, paper_frame: pd.DataFrame,
                 setting: bool, rank_rows: list[dict[str, Any]], set_summary: dict[str, Any]) -> list[str]:
    """Rank agreement rows (appended to ``rank_rows``) and, in the paper's setting, the Markdown lines and
    CSV of the paper's values beside the measured ones."""
    metrics = [c for c, _ in TABLES[table]]
    theirs = pt.paper_values(paper_frame, paper, metrics)
    if theirs.empty:
        return [f"({paper}: no values of the paper to compare with.)", ""]
    ours = pt.measured_means(rows, metrics)
    rank_rows.extend(pt.rank_agreement(ours, theirs, set_name, paper).to_dict("records"))
    if not setting:
        return []
    long = pt.comparison(ours, theirs)
    atomic_write(out / "tables" / f"{set_name}_{table}_vs_paper.csv", lambda tmp: long.to_csv(tmp, index=False))
    set_summary.setdefault("paper", {})[table] = pt.records(long)
    wide = pt.comparison_wide(long, dict(TABLES[table]), method_order(list(ours.index)))
    return [f"The paper's {paper} beside the measured values (Δ = measured - paper):", "", markdown_table(wide), ""]


def _shown_path(path: str) -> str:
    """A path relative to the working directory when it lies below it."""
    import os

    relative = os.path.relpath(path) if path else path
    return relative if path and not relative.startswith("..") else path


def _mean_curves(curves: pd.DataFrame, name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    part = curves[curves["curve"] == name]
    out = {}
    for method in method_order(list(part["method"].unique())):
        mean = part[part["method"] == method].groupby("x")["value"].mean()
        out[method] = (mean.index.to_numpy(), mean.to_numpy())
    return out


def plot_curves(curves: pd.DataFrame, folder: Path, name: str, label: str) -> list[Path]:
    """The set's curve figures (mean over images); returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not len(curves):
        return []
    methods = method_order(list(curves["method"].unique()))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    paths = []
    mif, lif = _mean_curves(curves, "mif"), _mean_curves(curves, "lif")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    for m in methods:
        x, y_mif = mif[m]
        axes[0].plot(x, y_mif, color=colours[m], label=m)
        axes[1].plot(x, lif[m][1], color=colours[m], label=m)
        axes[2].plot(x, lif[m][1] - y_mif, color=colours[m], label=m)
    for ax, title in zip(axes, ("MIF (most important first)", "LIF (least important first)", "LIF - MIF"),
                         strict=True):
        ax.set(title=title, xlabel="pixels perturbed (%)", ylabel="target output")
        ax.grid(alpha=0.3)
    axes[2].axhline(0, color="k", lw=0.8)
    axes[2].legend(fontsize=8, loc="best")
    fig.suptitle(f"{label}: perturbation curves (mean over images)")
    paths.append(save_figure(fig, folder / f"{name}_fidelity.png"))

    box = _mean_curves(curves, "f_box")
    fig, ax = plt.subplots(figsize=(6.5, 4.2), constrained_layout=True)
    for m in methods:
        ax.plot(*box[m], marker="o", ms=3, color=colours[m], label=m)
    ax.set(title=f"{label}: box sensitivity", xlabel="box side (patches)", ylabel="f_box (Pearson r)")
    ax.axhline(0, color="k", lw=0.8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(save_figure(fig, folder / f"{name}_box_sensitivity.png"))

    if (curves["curve"] == "mif_prime").any():
        mif_p, lif_p, box_p = (_mean_curves(curves, c) for c in ("mif_prime", "lif_prime", "f_box_prime"))
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
        for m in methods:
            x = mif[m][0]
            axes[0].plot(x, lif_p[m][1] - mif_p[m][1], color=colours[m], label=m)
            axes[1].plot(x, (lif[m][1] - mif[m][1]) - (lif_p[m][1] - mif_p[m][1]), color=colours[m], label=m)
            axes[2].plot(box[m][0], box[m][1] - box_p[m][1], marker="o", ms=3, color=colours[m], label=m)
        axes[0].set(title="LIF' - MIF' (ranked by the other class's map)", xlabel="pixels perturbed (%)")
        axes[1].set(title="Δ(LIF - MIF)", xlabel="pixels perturbed (%)")
        axes[2].set(title="Δ f_box", xlabel="box side (patches)")
        for ax in axes:
            ax.axhline(0, color="k", lw=0.8)
            ax.grid(alpha=0.3)
        axes[2].legend(fontsize=8)
        fig.suptitle(f"{label}: class discrimination (mean over images)")
        paths.append(save_figure(fig, folder / f"{name}_class_discrimination.png"))
    return paths
