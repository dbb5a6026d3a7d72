"""Tables and figures of a cohort run (:mod:`lidc_cdam.evaluate.cohort`) from its tidy tables.

* ``tables/evidence_share.csv``: per model, target and method the mean positive-evidence share in the
  consensus mask, the 3 mm ring and the background with 95 % percentile-bootstrap intervals over nodules,
  the uniform map's shares, and the pointing game;
* ``tables/faithfulness.csv``: A_MIF, A_LIF, A_LIF-MIF, A_box, compactness (mean, sem, n);
* ``tables/correlation.csv``: the reference map's Pearson correlation with each other map (mean, bootstrap
  interval, median, share of nodules with r > 0);
* ``tables/blur_baseline.csv``: each target on the original and on the fully blurred slice;
* ``tables/speed.csv``: seconds per nodule and the ratios to the forward-pass lower bounds;
* ``tables.md`` and ``figures/evidence_share.png``, ``figures/correlation_heatmap.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lidc_cdam.evaluate.report import markdown_table, method_order, randomization_table, randomization_verdicts
from lidc_cdam.io import atomic_write, write_json
from lidc_cdam.viz import save_figure

N_BOOTSTRAP = 2000


def bootstrap_ci(values: np.ndarray, n: int = N_BOOTSTRAP, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (NaNs dropped; NaN for fewer than 2 values)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n, len(v)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _ordered(frame: pd.DataFrame) -> pd.DataFrame:
    methods = method_order(list(frame["method"].unique()))
    rank = {m: i for i, m in enumerate(methods)}
    return frame.sort_values(["model", "target_order", "method"],
                             key=lambda s: s.map(rank) if s.name == "method" else s)


def _target_order(metrics: pd.DataFrame) -> dict[tuple[str, str], int]:
    pairs = list(dict.fromkeys(zip(metrics["model"], metrics["target"], strict=True)))
    return {p: i for i, p in enumerate(pairs)}


def evidence_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Evidence shares per (model, target, method) with bootstrap intervals; uniform shares; pointing game."""
    order = _target_order(metrics)
    rows = []
    for (model, target, method), g in metrics.groupby(["model", "target", "method"], sort=False):
        row: dict[str, Any] = {"model": model, "target": target, "target_kind": g["target_kind"].iloc[0],
                               "method": method, "target_order": order[(model, target)],
                               "n": int(g["share_mask"].notna().sum())}
        for region in ("mask", "ring", "background"):
            values = g[f"share_{region}"].to_numpy(float)
            lo, hi = bootstrap_ci(values)
            row.update({f"share_{region}": np.nanmean(values), f"share_{region}_lo": lo, f"share_{region}_hi": hi,
                        f"uniform_{region}": g[f"uniform_{region}"].mean()})
        row["mask_over_uniform"] = row["share_mask"] / row["uniform_mask"] if row["uniform_mask"] > 0 else np.nan
        row["pointing_hit"] = g["pointing_hit"].mean()
        rows.append(row)
    return _ordered(pd.DataFrame(rows)).drop(columns="target_order").reset_index(drop=True)


FAITHFULNESS = ("a_mif", "a_lif", "a_lif_mif", "a_box", "compactness")


def faithfulness_table(metrics: pd.DataFrame) -> pd.DataFrame:
    order = _target_order(metrics)
    grouped = metrics.groupby(["model", "target", "method"], sort=False)
    stats = grouped[list(FAITHFULNESS)].agg(["mean", "sem", "count"])
    stats.columns = [f"{c}_{s}" for c, s in stats.columns]
    stats = stats.reset_index()
    stats["target_order"] = [order[(m, t)] for m, t in zip(stats["model"], stats["target"], strict=True)]
    return _ordered(stats).drop(columns="target_order").reset_index(drop=True)


def correlation_table(correlations: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (method, model, target), g in correlations.groupby(["method", "model", "target"], sort=False):
        r = g["r"].to_numpy(float)
        lo, hi = bootstrap_ci(r)
        rows.append({"reference": g["reference"].iloc[0], "method": method, "model": model, "target": target,
                     "target_kind": g["target_kind"].iloc[0], "mean_r": float(np.nanmean(r)), "r_lo": lo, "r_hi": hi,
                     "median_r": float(np.nanmedian(r)), "share_positive": float(np.mean(r > 0)), "n": len(r)})
    return pd.DataFrame(rows)


def blur_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per model and target: mean value on the original and on the fully blurred slice, and their correlation
    over nodules (one row per nodule: the first method's rows)."""
    first = metrics[metrics["method"] == metrics["method"].iloc[0]]
    rows = []
    for (model, target), g in first.groupby(["model", "target"], sort=False):
        a, b = g["target_value"].to_numpy(float), g["target_value_blurred"].to_numpy(float)
        r = float(np.corrcoef(a, b)[0, 1]) if len(a) > 1 and a.std() > 0 and b.std() > 0 else float("nan")
        rows.append({"model": model, "target": target, "n": len(a), "mean_original": a.mean(),
                     "mean_blurred": b.mean(), "r_original_blurred": r})
    return pd.DataFrame(rows)


def speed_table(timing: pd.DataFrame) -> pd.DataFrame:
    """Seconds per nodule (all targets and methods) per model and in total, and the ratios to the lower bounds:
    one forward per nodule for the maps, one forward per perturbed image for the evaluation."""
    rows = []
    for model, g in timing.groupby("model", sort=False):
        n = g["nodules"].sum()
        per_image = float(np.average(g["per_image_forward_seconds"], weights=g["nodules"]))
        forward = g["forward_seconds"].sum() / n
        explain_s = g["explain_seconds"].sum() / n
        evaluate_s = g["evaluate_seconds"].sum() / n
        images = g["evaluate_forward_images"].sum() / n
        rows.append({"model": model, "nodules": int(n), "targets": int(g["targets"].iloc[0]),
                     "forward_s_per_nodule": forward, "explain_s_per_nodule": explain_s,
                     "explain_ratio_to_forward": explain_s / forward,
                     "evaluate_s_per_nodule": evaluate_s, "evaluate_forwards_per_nodule": images,
                     "evaluate_lower_bound_s": images * per_image,
                     "evaluate_ratio_to_lower_bound": evaluate_s / (images * per_image)})
    frame = pd.DataFrame(rows)
    if len(frame) > 1:
        total = {"model": "all", "nodules": int(frame["nodules"].iloc[0]), "targets": int(frame["targets"].sum())}
        for c in ("forward_s_per_nodule", "explain_s_per_nodule", "evaluate_s_per_nodule",
                  "evaluate_forwards_per_nodule", "evaluate_lower_bound_s"):
            total[c] = frame[c].sum()
        total["explain_ratio_to_forward"] = total["explain_s_per_nodule"] / total["forward_s_per_nodule"]
        total["evaluate_ratio_to_lower_bound"] = total["evaluate_s_per_nodule"] / total["evaluate_lower_bound_s"]
        frame = pd.concat([frame, pd.DataFrame([total])], ignore_index=True)
    return frame


def method_speed_table(timing: pd.DataFrame) -> pd.DataFrame:
    """Per method: seconds per nodule for the maps of every target of every model, and the ratio to one
    forward pass of every model per nodule."""
    columns = [c for c in timing.columns if c.startswith("explain_seconds_")]
    nodules = timing.groupby("model")["nodules"].sum().iloc[0]
    forward = timing["forward_seconds"].sum() / nodules
    seconds = timing[columns].sum() / nodules
    frame = pd.DataFrame({"method": [c[len("explain_seconds_"):] for c in columns], "s_per_nodule": seconds.to_numpy(),
                          "ratio_to_forward": seconds.to_numpy() / forward})
    return frame.set_index("method").loc[method_order(list(frame["method"]))].reset_index()


def _label(model: str, target: str, models: list[str]) -> str:
    return target if len(models) == 1 else f"{model}: {target}"


def evidence_figure(evidence: pd.DataFrame, path: Path, title: str) -> Path:
    """One panel per method: the share of positive evidence in the mask and the ring per target, 95 % bootstrap
    intervals, the uniform map's shares as markers."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    methods = method_order(list(evidence["method"].unique()))
    models = list(dict.fromkeys(evidence["model"]))
    cols = min(len(methods), 2)
    rows = int(np.ceil(len(methods) / cols))
    n_targets = evidence.groupby("method").size().max()
    fig, axes = plt.subplots(rows, cols, figsize=(max(3.2, 0.32 * n_targets) * cols, 3.6 * rows),
                             constrained_layout=True, squeeze=False, sharey=True)
    for ax, method in zip(axes.flat, methods, strict=False):
        part = evidence[evidence["method"] == method]
        x = np.arange(len(part))
        for offset, region, colour in ((-0.2, "mask", "tab:orange"), (0.2, "ring", "tab:blue")):
            mean = part[f"share_{region}"].to_numpy(float)
            err = np.vstack([mean - part[f"share_{region}_lo"], part[f"share_{region}_hi"] - mean])
            ax.bar(x + offset, mean, 0.4, yerr=np.nan_to_num(err), color=colour, capsize=1.5,
                   label=f"share in {region}")
            ax.scatter(x + offset, part[f"uniform_{region}"], marker="_", s=60, color="k", zorder=3,
                       label="uniform map" if region == "mask" else None)
        ax.set_xticks(x, [_label(m, t, models) for m, t in zip(part["model"], part["target"], strict=True)],
                      rotation=90, fontsize=6)
        ax.set_title(method, fontsize=9)
        ax.set_ylim(0, 1)
    for ax in axes.flat[len(methods):]:
        ax.axis("off")
    axes.flat[0].set_ylabel("share of positive evidence")
    axes.flat[0].legend(fontsize=6, loc="upper right")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def correlation_figure(corr: pd.DataFrame, path: Path, title: str) -> Path:
    """Heat map: methods (rows) x other targets (columns), mean Pearson r with the reference map."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(corr["model"]))
    corr = corr.assign(column=[_label(m, t, models) for m, t in zip(corr["model"], corr["target"], strict=True)])
    grid = corr.pivot(index="method", columns="column", values="mean_r")
    grid = grid.loc[method_order(list(grid.index)), list(dict.fromkeys(corr["column"]))]
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * grid.shape[1], 1.2 + 0.4 * grid.shape[0]), constrained_layout=True)
    image = ax.imshow(grid.to_numpy(float), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    for (i, j), v in np.ndenumerate(grid.to_numpy(float)):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if abs(v) > 0.6 else "black")
    ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=90, fontsize=7)
    ax.set_yticks(range(grid.shape[0]), grid.index, fontsize=7)
    fig.colorbar(image, ax=ax, label=f"mean Pearson r with the {corr['reference'].iloc[0]} map")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def _md(frame: pd.DataFrame, index: str, columns: dict[str, str]) -> str:
    shown = frame.set_index(index)[list(columns)].rename(columns=columns)
    return markdown_table(shown, index)


def write_cohort_report(out: Path, metrics: pd.DataFrame, correlations: pd.DataFrame, timing: pd.DataFrame,
                        randomization: pd.DataFrame | None, run: dict[str, Any]) -> dict[str, Any]:
    """``tables.md``, ``tables/*.csv``, ``figures/*.png`` and ``summary.json``; returns the summary."""
    settings = run["settings"]
    note = run["note"]
    reference = settings["reference"]
    tables = out / "tables"
    lines = [f"# LIDC cohort evaluation ({note})", ""]
    if run.get("phantoms"):
        lines += ["**Phantoms, not CT**: the nodules are rendered from the LIDC-IDRI consensus contours into a "
                  "synthetic lung background; these numbers say how the methods behave on the phantom models, "
                  "not how they behave on CT.", ""]
    checkpoints = ", ".join(f"`{c['name']}` (fold {c['fold']}, sha256 {c['sha256'][:12]})" for c in run["checkpoints"])
    n_nodules = int(metrics["nodule_id"].nunique()) if len(metrics) else 0
    lines += [f"Checkpoints: {checkpoints}. Test folds: {run['folds']}; {n_nodules} test nodules "
              f"(central slice of each crop). Methods: {', '.join(method_order(list(settings['methods'])))}.",
              f"Perturbation baseline: Gaussian blur with sigma = {settings['blur_mm']:g} mm in HU on the crop's 1 mm "
              "plane, then the checkpoint's input transforms. Ring: the pixels within "
              f"{settings['ring_mm']:g} mm outside the consensus mask. Intervals: 95 % percentile bootstrap over "
              f"nodules ({N_BOOTSTRAP} resamples).", ""]
    summary: dict[str, Any] = {"note": note, "nodules": n_nodules, "folds": run["folds"], "figures": []}
    if not len(metrics):
        lines.append("No nodules evaluated.")
        atomic_write(out / "tables.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
        write_json(out / "summary.json", summary)
        return summary

    evidence = evidence_table(metrics)
    faith = faithfulness_table(metrics)
    for name, frame in (("evidence_share", evidence), ("faithfulness", faith)):
        atomic_write(tables / f"{name}.csv", lambda tmp, f=frame: f.to_csv(tmp, index=False))
    share_cols = {"share_mask": "in mask ↑", "uniform_mask": "uniform: mask", "share_ring": "in 3 mm ring",
                  "uniform_ring": "uniform: ring", "share_background": "background ↓",
                  "uniform_background": "uniform: bg", "pointing_hit": "pointing ↑"}
    ref_rows = evidence[evidence["target"] == reference]
    if len(ref_rows):
        lines += [f"## Where the positive evidence lies: the `{reference}` target, per method", "",
                  _md(ref_rows, "method", share_cols), ""]
    cdam = evidence[evidence["method"] == "cdam"].assign(
        label=lambda f: [_label(m, t, list(dict.fromkeys(evidence["model"]))) for m, t in zip(f["model"], f["target"],
                                                                                            strict=True)])
    if len(cdam):
        lines += ["## Where the positive evidence lies: CDAM, per target", "",
                  _md(cdam, "label", share_cols), ""]
    fig = evidence_figure(evidence, out / "figures" / "evidence_share.png",
                          f"Share of positive evidence per target ({note}; 95 % bootstrap intervals)")
    summary["figures"].append(str(fig.relative_to(out)))
    lines += ["![evidence share](figures/evidence_share.png)", ""]

    faith_cols = {"a_mif_mean": "A_MIF ↓", "a_lif_mean": "A_LIF ↑", "a_lif_mif_mean": "A_LIF-MIF ↑",
                  "a_box_mean": "A_box ↑", "compactness_mean": "compactness ↑"}
    ref_faith = faith[faith["target"] == reference]
    if len(ref_faith):
        lines += [f"## Faithfulness on the crops: the `{reference}` target", "",
                  "Areas: MIF / LIF in output x percent of pixels perturbed (0-95 %), box sensitivity in patch units.",
                  "", _md(ref_faith, "method", faith_cols), ""]
    cdam_faith = faith[faith["method"] == "cdam"]
    if len(cdam_faith):
        lines += ["## Faithfulness on the crops: CDAM, per target (outputs: the output; concepts: g(l, l_c))", "",
                  _md(cdam_faith.assign(label=lambda f: f["model"] + ": " + f["target"]), "label", faith_cols), ""]

    if len(correlations):
        corr = correlation_table(correlations)
        atomic_write(tables / "correlation.csv", lambda tmp: corr.to_csv(tmp, index=False))
        fig = correlation_figure(corr, out / "figures" / "correlation_heatmap.png",
                                 f"Do the maps co-locate with the {reference} map? ({note})")
        summary["figures"].append(str(fig.relative_to(out)))
        per_target = corr[corr["method"] == "cdam"]
        if len(per_target):
            lines += [f"## Correlation of the `{reference}` CDAM with each other CDAM, per nodule", "",
                      _md(per_target.assign(label=lambda f: f["model"] + ": " + f["target"]), "label",
                          {"mean_r": "mean r", "r_lo": "95 % CI lo", "r_hi": "95 % CI hi", "median_r": "median r",
                           "share_positive": "share r > 0"}), ""]
        by_method = corr.groupby("method")["mean_r"].agg(["mean", "min", "max"]).loc[
            method_order(list(corr["method"].unique()))]
        lines += ["Mean over targets of the per-target mean r, per method:", "",
                  markdown_table(by_method.rename(columns={"mean": "mean r", "min": "lowest target",
                                                           "max": "highest target"}), "method"), "",
                  "![correlation heat map](figures/correlation_heatmap.png)", ""]
        summary["correlation_cdam"] = {f"{r.model}: {r.target}": r.mean_r for r in per_target.itertuples()}

    blur = blur_table(metrics)
    atomic_write(tables / "blur_baseline.csv", lambda tmp: blur.to_csv(tmp, index=False))
    lines += ["## The blur baseline", "",
              f"Each target's value on the original slice and on the whole slice blurred (sigma = "
              f"{settings['blur_mm']:g} mm), over the nodules: a neutral baseline would remove the evidence (low r). "
              "A blurred nodule is a larger, smoother blob, not an absent one: read MIF / LIF and box sensitivity "
              "with that in mind.", "",
              _md(blur.assign(label=lambda f: f["model"] + ": " + f["target"]), "label",
                  {"mean_original": "mean original", "mean_blurred": "mean blurred",
                   "r_original_blurred": "r (original, blurred)"}), ""]

    if randomization is not None and len(randomization):
        lines += ["## Cascading model randomisation", "",
                  f"Maps after randomising the head, then the last blocks, against the trained model's "
                  f"({int(randomization['nodules'].iloc[0])} nodules); a method passes when its maps change "
                  "(Spearman < 0.9) at every stage.", ""]
        for (model, kind), g in randomization.groupby(["model", "targets"], sort=False):
            # a concept target reads the latent, not the head: only the block stages can change its maps
            verdicts = randomization_verdicts(g[g["stage"] != "head"] if kind == "concepts" else g)
            table = randomization_table(g)
            table["verdict"] = [verdicts[m] for m in table.index]
            heading = f"`{model}`, {kind}" + (" (verdict on the block stages: concepts do not read the head)"
                                              if kind == "concepts" else "")
            lines += [f"{heading}:", "", markdown_table(table.drop(columns="verdict"), "method"), "",
                      "; ".join(f"{m}: {v}" for m, v in verdicts.items()), ""]

    if len(timing):
        speed = speed_table(timing)
        atomic_write(tables / "speed.csv", lambda tmp: speed.to_csv(tmp, index=False))
        lines += ["## Speed", "",
                  "Seconds per nodule for all targets and methods. Lower bounds: one forward pass per nodule for the "
                  "maps; one forward pass per perturbed image (MIF/LIF levels of every map, the boxes shared by all "
                  "methods and targets) at a batch of 256 for the evaluation.", "",
                  _md(speed, "model", {"targets": "targets", "forward_s_per_nodule": "forward s",
                                       "explain_s_per_nodule": "maps s", "explain_ratio_to_forward": "maps / forward",
                                       "evaluate_s_per_nodule": "evaluation s",
                                       "evaluate_forwards_per_nodule": "forwards",
                                       "evaluate_ratio_to_lower_bound": "evaluation / bound"}), ""]
        by_method = method_speed_table(timing)
        atomic_write(tables / "speed_methods.csv", lambda tmp: by_method.to_csv(tmp, index=False))
        lines += ["Maps per method (every target of every model):", "",
                  _md(by_method, "method", {"s_per_nodule": "s / nodule", "ratio_to_forward": "/ forward"}), ""]
        summary["speed"] = speed.to_dict(orient="records")
        summary["speed_methods"] = by_method.to_dict(orient="records")
    summary["evidence_cdam"] = {f"{r.model}: {r.target}": {"mask": r.share_mask, "uniform_mask": r.uniform_mask,
                                                          "ring": r.share_ring, "background": r.share_background}
                                for r in evidence[evidence["method"] == "cdam"].itertuples()}
    atomic_write(out / "tables.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    write_json(out / "summary.json", summary)
    return summary
