"""The paper's values (Tables 1, 2, 3 and S1) beside a benchmark's: loading, matching, rank agreement.

The values are committed in ``data_manifest/paper_tables.csv`` (long format, one value per row; see
``data_manifest/README.md``) and read through :func:`lidc_cdam.resources.manifest_path`.

Which paper table a benchmark table corresponds to is said per image set by its ``paper_tables``
mapping (``{"fidelity": "Table 1", ...}``). Two uses:

* **Rank agreement**, for every run: per metric, Spearman's rho between the measured means and the
  paper's values over the methods present in both. It compares orderings of the values themselves,
  so +1 means the same order whichever direction is better (for A_MIF lower is better in both).
  Fewer than :data:`MIN_METHODS` common methods, or a constant column on either side, gives NaN with
  a note instead of scipy's warning.
* **Paper values beside the measured ones** (with the difference measured - paper), only in the
  paper's setting: the config says ``paper_setting: true`` (``pipelines/configs/paper-imagenet.yaml``:
  the paper's model, image sets and metric settings), so that absolute values are comparable. Other
  runs (the offline digits preset) measure something else on another scale; only orderings compare.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lidc_cdam.resources import manifest_path

PAPER_TABLES_FILE = "paper_tables.csv"
COLUMNS = ("table", "image_set", "method", "paper_row", "metric", "paper_column", "value")
#: fewest methods in both rankings for a Spearman correlation to be reported
MIN_METHODS = 3
RANK_COLUMNS = ("image_set", "metric", "paper_table", "n_methods", "spearman", "note")


def load_paper_tables(path: str | Path | None = None) -> pd.DataFrame:
    """The paper's values in long format (columns :data:`COLUMNS`, ``value`` a float); a copy."""
    if path is None:
        path = manifest_path(PAPER_TABLES_FILE)
    return _read(str(path)).copy()


@lru_cache(maxsize=4)
def _read(path: str) -> pd.DataFrame:
    frame = pd.read_csv(path, dtype={c: str for c in COLUMNS if c != "value"})
    missing = set(COLUMNS) - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
    frame["value"] = frame["value"].astype(float)
    return frame


def is_paper_setting(config: Any) -> bool:
    """Whether a benchmark config declares itself the paper's setting (``paper_setting: true``)."""
    return bool(getattr(config, "paper_setting", False))


def paper_values(paper: pd.DataFrame, table: str | None, metrics: list[str]) -> pd.DataFrame:
    """The paper's ``table`` as methods (rows, the paper's order) x our metric names (columns, those of
    ``metrics`` the table has); empty when the table is unknown or ``None``."""
    part = paper[(paper["table"] == table) & paper["metric"].isin(metrics)] if table else paper.iloc[:0]
    if not len(part):
        return pd.DataFrame()
    wide = part.pivot(index="method", columns="metric", values="value")
    order = list(dict.fromkeys(part["method"]))
    return wide.loc[order, [m for m in metrics if m in wide.columns]]


def measured_means(rows: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Mean per method (rows) of each of ``metrics`` found in the tidy metrics ``rows``."""
    present = [m for m in metrics if m in rows]
    if not len(rows) or not present:
        return pd.DataFrame()
    return rows.groupby("method")[present].mean()


def spearman(measured: pd.Series, paper: pd.Series) -> tuple[int, float, str]:
    """``(n common methods, rho, note)``; rho is NaN (with a note saying why) when undefined."""
    both = pd.concat({"measured": measured, "paper": paper}, axis=1, join="inner").dropna()
    n = len(both)
    if n < MIN_METHODS:
        return n, math.nan, f"fewer than {MIN_METHODS} methods in both"
    constant = [side for side in ("measured", "paper") if both[side].nunique() < 2]
    if constant:
        return n, math.nan, " and ".join(constant) + " values constant: no ordering"
    from scipy.stats import spearmanr

    return n, float(spearmanr(both["measured"], both["paper"]).statistic), ""


def rank_agreement(measured: pd.DataFrame, paper: pd.DataFrame, image_set: str = "",
                   paper_table: str = "") -> pd.DataFrame:
    """One row per metric the two wide tables (methods x metrics) share: columns :data:`RANK_COLUMNS`."""
    rows = []
    for metric in [m for m in paper.columns if m in measured.columns]:
        n, rho, note = spearman(measured[metric], paper[metric])
        rows.append({"image_set": image_set, "metric": metric, "paper_table": paper_table, "n_methods": n,
                     "spearman": rho, "note": note})
    return pd.DataFrame(rows, columns=list(RANK_COLUMNS))


def comparison(measured: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    """Long table: ``method, metric, measured, paper, difference`` (measured - paper) over the measured
    methods (the paper's order, then the others; paper NaN where it has no value) and the metrics both have."""
    order = [m for m in paper.index if m in measured.index] + sorted(set(measured.index) - set(paper.index))
    rows = []
    for metric in [m for m in paper.columns if m in measured.columns]:
        for method, value in measured.loc[order, metric].items():
            ref = paper[metric].get(method, np.nan)
            rows.append({"method": method, "metric": metric, "measured": float(value), "paper": float(ref),
                         "difference": float(value) - float(ref)})
    return pd.DataFrame(rows, columns=["method", "metric", "measured", "paper", "difference"])


def comparison_wide(long: pd.DataFrame, headers: dict[str, str], order: list[str]) -> pd.DataFrame:
    """The comparison as methods (``order``) x [header, header + " paper", header + " Δ"] per metric."""
    columns = {}
    for metric in dict.fromkeys(long["metric"]):
        part = long[long["metric"] == metric].set_index("method")
        header = headers.get(metric, metric)
        columns[header] = part["measured"]
        columns[f"{header} paper"] = part["paper"]
        columns[f"{header} Δ"] = part["difference"]
    return pd.DataFrame(columns).reindex([m for m in order if m in set(long["method"])])


def rank_markdown(frame: pd.DataFrame) -> str:
    """Rank-agreement rows as a Markdown table."""
    lines = ["| image set | metric | paper table | methods | Spearman ρ | note |", "|---|---|---|---:|---:|---|"]
    for r in frame.itertuples(index=False):
        rho = "n/a" if not np.isfinite(r.spearman) else f"{r.spearman:.2f}"
        lines.append(f"| {r.image_set} | {r.metric} | {r.paper_table} | {r.n_methods} | {rho} | {r.note} |")
    return "\n".join(lines)


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as JSON-ready dicts (NaN -> None)."""
    return [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
            for row in frame.astype(object).to_dict("records")]
