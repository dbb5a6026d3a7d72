"""The 5-fold runner: one fine-tuning per fold (train / validation / test parts of the committed
folds), a summary per fold and mean +- sd, the reference baselines in the same table, and the
learning curves.

Baselines (fitted on the fold's training and validation parts, scored on its test part):
malignancy: a threshold on the mean annotated diameter (docs/method.md, "Data": one feature alone classifies the 854
nodules at 0.875) and a logistic regression on the eight biomarkers; biomarkers: the training mean
(MSE in standardised units, i.e. about 1).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lidc_cdam.io import atomic_write, write_json
from lidc_cdam.train.config import TrainConfig, config_from_dict
from lidc_cdam.train.engine import FoldData, Process, current_process, r_squared, train_fold
from lidc_cdam.viz import save_figure

BIOMARKERS = ("subtlety", "calcification", "sphericity", "margin", "lobulation", "spiculation", "texture",
              "diameter_mm")


def diameter_threshold(train: pd.DataFrame, test: pd.DataFrame) -> dict[str, float]:
    """The accuracy-maximising threshold on ``diameter_mm`` (malignant above it), from ``train``."""
    from sklearn.metrics import roc_auc_score

    d, y = train["diameter_mm"].to_numpy(), train["label"].to_numpy()
    candidates = np.unique(d)
    accuracy = [((d > t) == y).mean() for t in candidates]
    threshold = float(candidates[int(np.argmax(accuracy))])
    yt = test["label"].to_numpy()
    return {"accuracy": float(((test["diameter_mm"].to_numpy() > threshold) == yt).mean()),
            "auc": float(roc_auc_score(yt, test["diameter_mm"])) if len(set(yt)) == 2 else np.nan,
            "threshold_mm": threshold}


def biomarker_logistic_regression(train: pd.DataFrame, test: pd.DataFrame) -> dict[str, float]:
    """Logistic regression on the eight (standardised) biomarkers."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    model.fit(train[list(BIOMARKERS)], train["label"])
    yt = test["label"].to_numpy()
    p = model.predict_proba(test[list(BIOMARKERS)])[:, 1]
    return {"accuracy": float(((p > 0.5) == yt).mean()),
            "auc": float(roc_auc_score(yt, p)) if len(set(yt)) == 2 else np.nan}


def training_mean_mse(train: pd.DataFrame, test: pd.DataFrame, names: list[str],
                      scale: list[float] | None = None) -> dict[str, float]:
    """MSE of predicting the training mean, in units standardised with the training statistics, or with
    ``scale`` (the model's target std, e.g. fitted with the phantom variants) so that both MSEs share units."""
    mean, std = train[names].mean(), train[names].std(ddof=0).replace(0, 1)
    if scale is not None:
        std = pd.Series(np.asarray(scale, dtype=float), index=names).replace(0, 1)
    standardised = (test[names] - mean) / std
    per = (standardised**2).mean()
    return {"mse": float(per.mean()), **{f"mse_{n}": float(v) for n, v in per.items()},
            **r_squared(per, standardised.var(ddof=0), names)}


def baselines(config: TrainConfig, nodules: pd.DataFrame, split: dict[str, list[str]],
              output_names: list[str], scale: list[float] | None = None) -> dict[str, dict[str, float]]:
    table = nodules.set_index("nodule_id")
    fit = table.loc[[*split["train"], *split["val"]]]
    test = table.loc[split["test"]]
    if config.task == "malignancy":
        return {"diameter threshold": diameter_threshold(fit, test),
                "logistic regression (8 biomarkers)": biomarker_logistic_regression(fit, test)}
    return {"training mean": training_mean_mse(fit, test, output_names, scale)}


def run_cross_validation(
    config: TrainConfig, out: str | Path, make_fold_data: Callable[[int], FoldData],
    nodules: pd.DataFrame | None = None, splits: Callable[[int], dict[str, list[str]]] | None = None,
    *, progress: bool = True, process: Process | None = None,
) -> pd.DataFrame | None:
    """Train every fold of ``config.folds`` into ``out/fold<k>/`` (resuming finished and
    interrupted folds), then write ``summary.csv`` / ``summary.md`` / ``per_fold.csv`` and
    ``learning_curves.png``; returns the per-fold table on the main process."""
    out = Path(out)
    process = process or current_process()
    rows = []
    for fold in config.folds:
        data = make_fold_data(fold)
        fold_dir = out / f"fold{fold}"
        done = fold_dir / "result.json"
        if done.exists():
            import json

            result = json.loads(done.read_text())
        else:
            result = train_fold(config.for_fold(fold), data, fold_dir, progress=progress, process=process)
        rows.append({"model": config.name, "fold": fold, "best_epoch": result["best_epoch"],
                     "seconds_per_epoch": result["seconds_per_epoch"], **result.get("test_metrics", {})})
        if nodules is not None and splits is not None:
            # with phantom variants the model's targets are standardised with their std too: the baseline's
            # MSE is given in the same units
            scale = (data.target_stats or {}).get("std") if data.info.get("train_variants") else None
            for name, metrics in baselines(config, nodules, splits(fold), data.output_names, scale).items():
                rows.append({"model": name, "fold": fold, **metrics})
    if not process.main:
        return None
    per_fold = pd.DataFrame(rows)
    atomic_write(out / "per_fold.csv", lambda tmp: per_fold.to_csv(tmp, index=False))
    summary = summarise(per_fold)
    atomic_write(out / "summary.csv", lambda tmp: summary.to_csv(tmp))
    atomic_write(out / "summary.md", lambda tmp: tmp.write_text(summary_markdown(config, summary, per_fold)))
    plot_learning_curves(out, config.folds)
    write_json(out / "summary.json", {"config": config.to_dict(), "summary": summary.reset_index().to_dict("records")})
    return per_fold


METRIC_COLUMNS = ("accuracy", "auc", "mse", "r2")


def summarise(per_fold: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd over folds per model, for the test metrics."""
    columns = [c for c in per_fold.columns if c in METRIC_COLUMNS or c.startswith(("mse_", "r2_", "variants_r2"))]
    grouped = per_fold.groupby("model", sort=False)[columns]
    summary = pd.concat({"mean": grouped.mean(), "sd": grouped.std(ddof=1)}, axis=1)
    summary.columns = [f"{c} {stat}" for stat, c in summary.columns]
    summary["folds"] = grouped.size()
    return summary


def summary_markdown(config: TrainConfig, summary: pd.DataFrame, per_fold: pd.DataFrame) -> str:
    main = [c for c in METRIC_COLUMNS if f"{c} mean" in summary]
    folds = ", ".join(str(f) for f in config.folds)
    lines = [f"# {config.name}: cross-validation ({config.task}), fold{'s' if len(config.folds) > 1 else ''} {folds}",
             "",
             "Test part of each fold, best checkpoint by validation; mean ± sd over folds.", "",
             "| model | " + " | ".join(main) + " | folds |", "|---|" + "---:|" * (len(main) + 1)]
    for model, row in summary.iterrows():
        cells = [("n/a" if not np.isfinite(row[f"{c} mean"]) else f"{row[f'{c} mean']:.3f}"
                  + (f" ± {row[f'{c} sd']:.3f}" if np.isfinite(row[f"{c} sd"]) else "")) for c in main]
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {int(row['folds'])} |")
    for prefix, title in (("mse_", "MSE per biomarker (standardised units):"),
                          ("r2_", "Held-out R^2 per biomarker (1 - MSE / variance of the test part's ratings):"),
                          ("variants_r2_", "Held-out R^2 on the test nodules' variants (every rating drawn on its "
                                           "own: a model scores only where it reads that biomarker's own cause):")):
        columns = [c for c in summary.columns if c.startswith(prefix) and c.endswith(" mean")]
        if columns:
            lines += ["", title, "", "| model | " + " | ".join(c[len(prefix):-5] for c in columns) + " |",
                      "|---|" + "---:|" * len(columns)]
            lines += [f"| {model} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |"
                      for model, row in summary.iterrows()]
    return "\n".join(lines) + "\n"


def fold_summary_markdown(out: Path, fold: int) -> str:
    """``summary.md`` as it reads for ``fold`` alone, from a run's ``per_fold.csv`` and ``summary.json`` (the run's
    own ``summary.md`` describes whichever folds its last call trained). Raises ValueError naming the file when the
    run has no row for ``fold``."""
    import json

    per_fold = pd.read_csv(out / "per_fold.csv")
    rows = per_fold[per_fold["fold"] == fold]
    if rows.empty:
        raise ValueError(f"{out / 'per_fold.csv'}: no row for fold {fold} (folds {sorted(set(per_fold['fold']))}); "
                         f"rewrite the summaries with `lidc-cdam train ... --folds 0-4` (finished folds are skipped)")
    config = config_from_dict(json.loads((out / "summary.json").read_text())["config"]).with_changes(folds=[fold])
    return summary_markdown(config, summarise(rows), rows)


def plot_learning_curves(out: Path, folds: list[int]) -> Path | None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    histories = {f: pd.read_csv(out / f"fold{f}" / "history.csv") for f in folds
                 if (out / f"fold{f}" / "history.csv").exists()}
    if not histories:
        return None
    key = next(c for c in ("val_auc", "val_mse") if c in next(iter(histories.values())))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for fold, h in histories.items():
        line = axes[0].plot(h["epoch"], h["train_loss"], label=f"fold {fold} train")[0]
        axes[0].plot(h["epoch"], h["val_loss"], "--", color=line.get_color(), label=f"fold {fold} val")
        axes[1].plot(h["epoch"], h[key], color=line.get_color(), label=f"fold {fold}")
    axes[0].set(title="loss", xlabel="epoch")
    axes[1].set(title=key.replace("_", " "), xlabel="epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, out / "learning_curves.png")


def fold_results(out: Path) -> dict[str, Any]:
    """The summary a finished run wrote (for the sweep and the demo)."""
    import json

    return json.loads((out / "summary.json").read_text())
