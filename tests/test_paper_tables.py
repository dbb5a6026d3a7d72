"""The paper's Tables 1, 2, 3 and S1 (data_manifest/paper_tables.csv): the transcription against the paper's
text, rank agreement, and the report's comparison with the paper (always the ranks; the values only in the
paper's setting)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from lidc_cdam.evaluate import paper_tables as pt
from lidc_cdam.evaluate.benchmark_config import (
    PAPER_METHOD_ORDER,
    BenchmarkConfig,
    ConfigError,
    ImageSetConfig,
    ModelConfig,
    load_config,
)
from lidc_cdam.evaluate.report import TABLES, write_report
from lidc_cdam.resources import manifest_path

REPO = Path(__file__).resolve().parents[1]
PAPER_TEXT = REPO.parent / "shared" / "paper" / "cdam-paper.txt"
FIDELITY = ["a_mif", "a_lif", "a_lif_mif", "a_box"]
EXPECTED = {  # table -> (image set, metrics in the paper's column order)
    "Table 1": ("X_multi", FIDELITY),
    "Table 2": ("X_multi", ["delta_a_lif_mif", "delta_a_box"]),
    "Table 3": ("X_multi", ["compactness"]),
    "Table S1": ("X_val", FIDELITY),
}
ROW_LABELS = {  # the paper's row labels (Table S1 abbreviates some)
    "CDAM": "cdam", "Integrated CDAM": "integrated-cdam", "Smooth CDAM": "smooth-cdam",
    "Relevance Propagation": "relevance-propagation", "Rel. Prop.": "relevance-propagation",
    "Partial LRP": "partial-lrp", "Attention map": "attention", "Att. map": "attention", "SmoothGrad": "smoothgrad",
    "IntGrad": "intgrad", "GradCAM": "gradcam", "Input \\times Grad": "input-x-grad", "Input x Grad": "input-x-grad",
}


@pytest.fixture(scope="module")
def paper() -> pd.DataFrame:
    return pt.load_paper_tables()


def value(paper: pd.DataFrame, table: str, method: str, metric: str) -> float:
    row = paper[(paper["table"] == table) & (paper["method"] == method) & (paper["metric"] == metric)]
    assert len(row) == 1, (table, method, metric)
    return float(row["value"].iloc[0])


# --- the committed file ----------------------------------------------------------------------------------------


def test_the_library_reads_the_committed_file_through_resources():
    path = manifest_path(pt.PAPER_TABLES_FILE)
    assert path.read_bytes() == (REPO / "data_manifest" / "paper_tables.csv").read_bytes()
    assert list(pd.read_csv(path).columns) == list(pt.COLUMNS)


def test_four_tables_of_ten_methods_in_the_papers_order(paper):
    assert paper.groupby("table", sort=False).size().to_dict() == {"Table 1": 40, "Table 2": 20, "Table 3": 10,
                                                                   "Table S1": 40}
    assert not paper.duplicated(["table", "method", "metric"]).any()
    assert paper["value"].notna().all()
    ours = {c for columns in TABLES.values() for c, _ in columns}
    for table, (image_set, metrics) in EXPECTED.items():
        part = paper[paper["table"] == table]
        assert list(dict.fromkeys(part["method"])) == list(PAPER_METHOD_ORDER)
        assert set(part["image_set"]) == {image_set}
        assert list(dict.fromkeys(part["metric"])) == metrics
        assert set(metrics) <= ours  # names of the tidy metrics table
        assert part.groupby("method").size().eq(len(metrics)).all()
        assert part.groupby("metric")["paper_column"].nunique().eq(1).all()


@pytest.mark.parametrize(("table", "method", "metric", "expected"), [
    # values the paper's prose quotes (section 4.2)
    ("Table 1", "smooth-cdam", "a_lif_mif", 827), ("Table 1", "integrated-cdam", "a_box", 13.0),
    ("Table 1", "smooth-cdam", "a_box", 12.4), ("Table S1", "integrated-cdam", "a_box", 12.9),
    ("Table S1", "relevance-propagation", "a_box", 12.7), ("Table 2", "cdam", "delta_a_lif_mif", 739),
    ("Table 2", "smooth-cdam", "delta_a_lif_mif", 823), ("Table 2", "integrated-cdam", "delta_a_lif_mif", 708),
    ("Table 2", "intgrad", "delta_a_lif_mif", 540), ("Table 2", "input-x-grad", "delta_a_lif_mif", 433),
    ("Table 2", "relevance-propagation", "delta_a_lif_mif", 293), ("Table 2", "attention", "delta_a_lif_mif", 0),
    ("Table 3", "cdam", "compactness", 0.88), ("Table 3", "input-x-grad", "compactness", 0.88),
    ("Table 3", "intgrad", "compactness", 0.84), ("Table 3", "smoothgrad", "compactness", 0.80),
    ("Table 3", "relevance-propagation", "compactness", 0.48),
    # a few more read off the tables
    ("Table 1", "cdam", "a_mif", 404), ("Table 1", "smoothgrad", "a_lif_mif", -4),
    ("Table S1", "smoothgrad", "a_lif_mif", -10), ("Table S1", "input-x-grad", "a_lif", 935),
])
def test_spot_values(paper, table, method, metric, expected):
    assert value(paper, table, method, metric) == pytest.approx(expected)


def test_lif_minus_mif_is_the_printed_difference_within_rounding(paper):
    """Within 2 (the printed areas are rounded), except one inconsistency of the paper itself: Integrated
    CDAM in Table S1, 1459 - 696 = 763 but 753 printed (see data_manifest/README.md)."""
    for table in ("Table 1", "Table S1"):
        wide = pt.paper_values(paper, table, FIDELITY)
        gap = wide["a_lif"] - wide["a_mif"] - wide["a_lif_mif"]
        known = ["integrated-cdam"] if table == "Table S1" else []
        assert (gap.drop(known).abs() <= 2).all(), gap
        if known:
            assert gap["integrated-cdam"] == 10


def parse_paper_table(lines: list[str], table: str) -> tuple[list[str], list[list[str]]]:
    """Header cells and rows (label, values...) of the tab-separated block just above the caption."""
    caption = next(i for i, line in enumerate(lines) if line.startswith(f"{table}:"))
    i = caption - 1
    while not lines[i].strip():
        i -= 1
    rows = []
    while "\t" in lines[i] and not lines[i].startswith("\t"):
        rows.insert(0, lines[i].split("\t"))
        i -= 1
    assert lines[i].startswith("\t"), f"{table}: no header line above the rows"
    return lines[i].split("\t")[1:], rows


@pytest.mark.skipif(not PAPER_TEXT.is_file(), reason="the paper's text (../shared/paper/) is not here")
def test_every_value_label_and_header_is_the_papers():
    lines = PAPER_TEXT.read_text().splitlines()
    with open(REPO / "data_manifest" / "paper_tables.csv", newline="") as fh:
        committed = list(csv.DictReader(fh))
    expected = []
    for table, (image_set, metrics) in EXPECTED.items():
        header, rows = parse_paper_table(lines, table)
        assert len(header) == len(metrics) and len(rows) == 10, table
        for label, *values in rows:
            for metric, column, printed in zip(metrics, header, values, strict=True):
                expected.append({"table": table, "image_set": image_set, "method": ROW_LABELS[label],
                                 "paper_row": label, "metric": metric, "paper_column": column, "value": printed})
    assert committed == expected


@pytest.mark.skipif(not PAPER_TEXT.is_file(), reason="the paper's text (../shared/paper/) is not here")
def test_column_order_agrees_with_the_prose():
    """The headers are read by position; the prose names the columns of the values it quotes."""
    text = PAPER_TEXT.read_text()
    for quote in ("$A_{\\text{LIF-MIF}} = 827$", "Integrated CDAM ($A_{\\text{box}} = 13.0$)",
                  "Relevance Propagation ($A_{\\text{box}} = 12.7$)", "CDAM ($A_{\\Delta(\\text{LIF-MIF})}=739$)"):
        assert quote in text
    header, _ = parse_paper_table(text.splitlines(), "Table 1")
    assert ["MIF" in header[0], "LIF}" in header[1], "LIF-MIF" in header[2], "box" in header[3]] == [True] * 4


# --- rank agreement --------------------------------------------------------------------------------------------


def test_spearman_equals_scipy_over_the_common_methods():
    measured = pd.Series({"cdam": 3.0, "gradcam": 1.0, "intgrad": 2.0, "attention": 2.0, "extra": 9.0,
                          "smoothgrad": np.nan})
    paper = pd.Series({"cdam": 10.0, "gradcam": 4.0, "intgrad": 7.0, "attention": 9.0, "smoothgrad": 1.0,
                       "partial-lrp": 3.0})
    n, rho, note = pt.spearman(measured, paper)
    common = ["cdam", "gradcam", "intgrad", "attention"]  # in both, finite
    assert (n, note) == (4, "")
    assert rho == pytest.approx(spearmanr(measured[common], paper[common]).statistic)
    frame = pt.rank_agreement(pd.DataFrame({"a_box": measured, "a_mif": -measured}),
                              pd.DataFrame({"a_box": paper, "a_mif": paper}), "set", "Table 1")
    assert list(frame.columns) == list(pt.RANK_COLUMNS)
    assert frame.set_index("metric")["spearman"].to_dict() == pytest.approx({"a_box": rho, "a_mif": -rho})


def test_the_papers_own_values_agree_perfectly(paper):
    for table, (_, metrics) in EXPECTED.items():
        wide = pt.paper_values(paper, table, metrics)
        frame = pt.rank_agreement(wide, wide, "x", table)
        assert list(frame["metric"]) == metrics
        assert (frame["n_methods"] == 10).all() and frame["spearman"].to_numpy() == pytest.approx(1.0)


def test_degenerate_cases_give_nan_with_a_note_and_no_warning():
    paper = pd.Series({"a": 1.0, "b": 2.0, "c": 3.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        n, rho, note = pt.spearman(pd.Series({"a": 1.0, "b": 2.0, "z": 5.0}), paper)
        assert n == 2 and math.isnan(rho) and "fewer than 3" in note
        n, rho, note = pt.spearman(pd.Series({"a": 0.0, "b": 0.0, "c": 0.0}), paper)
        assert n == 3 and math.isnan(rho) and "measured values constant" in note
        n, rho, note = pt.spearman(paper, pd.Series({"a": 7.0, "b": 7.0, "c": 7.0}))
        assert n == 3 and math.isnan(rho) and "paper values constant" in note
        n, rho, note = pt.spearman(pd.Series(dtype=float), paper)
        assert n == 0 and math.isnan(rho)
    assert pt.paper_values(pt.load_paper_tables(), "compactness on X_val", ["compactness"]).empty
    assert pt.paper_values(pt.load_paper_tables(), None, ["compactness"]).empty


# --- the config marker -----------------------------------------------------------------------------------------


def test_only_the_paper_preset_is_the_papers_setting(tmp_path):
    configs = REPO / "pipelines" / "configs"
    roots = ["model.checkpoint=x.pt", "image_sets.xmulti.root=/x", "image_sets.xval.root=/x"]
    paper_config = load_config(configs / "paper-imagenet.yaml", roots)
    offline = load_config(configs / "offline-multi-object.yaml")
    assert pt.is_paper_setting(paper_config) and not pt.is_paper_setting(offline)
    # a report setting: it does not change results, so resuming a run is not refused
    assert dataclasses.replace(offline, paper_setting=True).fingerprint() == offline.fingerprint()
    with pytest.raises(ConfigError, match="paper_setting"):
        load_config(configs / "paper-imagenet.yaml", [*roots, "paper_setting=maybe"])


# --- the report ------------------------------------------------------------------------------------------------

METHODS = ["cdam", "integrated-cdam", "smooth-cdam", "attention", "intgrad", "gradcam"]


def fake_metrics(paper: pd.DataFrame) -> pd.DataFrame:
    """Three images per method whose means are the paper's Table 1 / 3 values (A_MIF + 1), Table 2's
    A_Delta(LIF-MIF) reversed, and a constant A_Delta box; a second set has no paper tables."""
    rows = []
    for image_set in ("digits", "other"):
        for i, offset in enumerate((-1.0, 0.0, 1.0)):
            for rank, method in enumerate(METHODS):
                row = {"image_set": image_set, "image_id": f"img{i}", "method": method, "c1": 1, "c2": 2,
                       "explain_seconds": 0.01, "delta_a_box": 0.5,
                       "delta_a_lif_mif": float(len(METHODS) - rank) + offset}
                for metric in FIDELITY:
                    row[metric] = value(paper, "Table 1", method, metric) + offset + (metric == "a_mif")
                row["compactness"] = value(paper, "Table 3", method, "compactness") + offset / 100
                rows.append(row)
    return pd.DataFrame(rows)


def fake_config(paper_setting: bool) -> BenchmarkConfig:
    tables = {"fidelity": "Table 1", "class_discrimination": "Table 2", "compactness": "Table 3"}
    return BenchmarkConfig(
        name="fake", model=ModelConfig(), methods={m: {} for m in METHODS}, paper_setting=paper_setting,
        image_sets=[ImageSetConfig(name="digits", source="multi-digits", n=3, paper_tables=tables),
                    ImageSetConfig(name="other", source="multi-digits", n=3,
                                   paper_tables={"compactness": "compactness on X_val"})])


def report(tmp_path: Path, paper: pd.DataFrame, paper_setting: bool) -> tuple[Path, dict, str]:
    out = tmp_path / ("paper" if paper_setting else "offline")
    curves = pd.DataFrame(columns=["image_set", "image_id", "method", "curve", "x", "value"])
    skipped = pd.DataFrame(columns=["image_set", "image_id", "reason"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        summary = write_report(fake_config(paper_setting), out, fake_metrics(paper), curves, skipped, None)
    return out, summary, (out / "tables.md").read_text()


def strict_json(path: Path) -> dict:
    def refuse(constant):
        raise ValueError(f"{path}: {constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def check_rank_agreement(out: Path, summary: dict, text: str) -> None:
    assert "## Rank agreement with the paper" in text
    rank = pd.read_csv(out / "tables" / "rank_agreement.csv")
    assert list(rank.columns) == list(pt.RANK_COLUMNS)
    assert set(rank["image_set"]) == {"digits"}  # "other" maps no table with transcribed values
    by_metric = rank.set_index("metric")
    assert list(by_metric.index) == [*FIDELITY, "delta_a_lif_mif", "delta_a_box", "compactness"]
    assert (by_metric["n_methods"] == len(METHODS)).all()
    assert by_metric.loc[[*FIDELITY, "compactness"], "spearman"].to_numpy() == pytest.approx(1.0)
    paper_order = [value(pt.load_paper_tables(), "Table 2", m, "delta_a_lif_mif") for m in METHODS]
    assert by_metric.loc["delta_a_lif_mif", "spearman"] == pytest.approx(
        spearmanr(np.arange(len(METHODS), 0, -1), paper_order).statistic)
    assert math.isnan(by_metric.loc["delta_a_box", "spearman"])
    assert "constant" in by_metric.loc["delta_a_box", "note"]
    assert "| digits | a_box | Table 1 | 6 | 1.00 |  |" in text
    assert "| digits | delta_a_box | Table 2 | 6 | n/a | measured values constant: no ordering |" in text
    assert "(compactness on X_val: no values of the paper to compare with.)" in text
    assert strict_json(out / "summary.json")["rank_agreement"] == summary["rank_agreement"]
    assert [r["spearman"] for r in summary["rank_agreement"] if r["metric"] == "delta_a_box"] == [None]


def test_report_outside_the_papers_setting_compares_ranks_only(tmp_path, paper):
    out, summary, text = report(tmp_path, paper, paper_setting=False)
    check_rank_agreement(out, summary, text)
    assert summary["paper_setting"] is False and "Not the paper's setting" in text
    assert "beside the measured values" not in text and " paper |" not in text
    assert not list((out / "tables").glob("*_vs_paper.csv"))


def test_report_in_the_papers_setting_shows_the_papers_values_and_differences(tmp_path, paper):
    out, summary, text = report(tmp_path, paper, paper_setting=True)
    check_rank_agreement(out, summary, text)
    assert summary["paper_setting"] is True
    for table in ("Table 1", "Table 2", "Table 3"):
        assert f"The paper's {table} beside the measured values (Δ = measured - paper):" in text
    assert "| method | A_MIF ↓ | A_MIF ↓ paper | A_MIF ↓ Δ | A_LIF ↑ |" in text
    assert "| cdam | 405 | 404 | 1 | 1038 | 1038 | 0 | 632 | 632 | 0 | 12.2 | 12.2 | " in text  # Δ A_box: ~0
    fidelity = pd.read_csv(out / "tables" / "digits_fidelity_vs_paper.csv")
    assert list(fidelity.columns) == ["method", "metric", "measured", "paper", "difference"]
    assert len(fidelity) == len(METHODS) * 4
    assert (fidelity["difference"] == fidelity["measured"] - fidelity["paper"]).all()
    by = fidelity.set_index(["method", "metric"])
    assert by.loc[("cdam", "a_mif"), ["measured", "paper", "difference"]].tolist() == pytest.approx([405, 404, 1])
    assert by.xs("a_box", level="metric")["difference"].to_numpy() == pytest.approx(0.0, abs=1e-9)
    assert sorted(p.name for p in (out / "tables").glob("*_vs_paper.csv")) == [
        "digits_class_discrimination_vs_paper.csv", "digits_compactness_vs_paper.csv",
        "digits_fidelity_vs_paper.csv"]
    assert summary["image_sets"]["digits"]["paper"]["compactness"][0]["paper"] == pytest.approx(0.88)
    assert "paper" not in summary["image_sets"]["other"]
