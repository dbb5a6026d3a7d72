"""The report page of an explained point (:mod:`lidc_cdam.ct.report`): PNG and PDF from a ``predictions.json``
entry, the crop and the maps, without models (``test_explain_ct`` runs it end to end)."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
from helpers import pdf_text

from lidc_cdam.ct.report import (
    RESEARCH_USE,
    UNLIKE,
    prediction_rows,
    table_lines,
    title_text,
    trust_state,
    write_point_report,
)
from lidc_cdam.ct.testing import BIOMARKERS
from lidc_cdam.models.demo_weights import sha256_of, shipped_checkpoint
from lidc_cdam.models.provenance import TRUST_CAUTION

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def entry_for(checkpoints, trust=None, padded_share=0.0, pid="nodule_7"):
    """A ``predictions.json`` entry as explain-ct writes it: a malignancy ensemble of the given checkpoints and
    one biomarker model."""
    n = len(checkpoints)
    return {"id": pid, "given": [1.0, 2.0, 3.0], "given_as": "lps_mm", "world_lps_mm": [-70.5, -30.25, -200.0],
            "index_ijk": [100.0, 120.5, 40.0], "padded_share": padded_share, "crop_size_mm": 32, "method": "cdam",
            "view": "axial",
            "tasks": [{"task": "malignancy", "targets": ["malignancy"], "checkpoints": [str(c) for c in checkpoints],
                       "n_models": n, "mean": {"malignancy": 0.71}, "sd": {"malignancy": 0.04 if n > 1 else 0.0},
                       "per_checkpoint": [{"malignancy": 0.71}] * n, "trust": trust,
                       "maps": {"malignancy": "malignancy"}},
                      {"task": "biomarkers", "targets": list(BIOMARKERS), "checkpoints": [str(checkpoints[0])],
                       "n_models": 1, "mean": {b: 3.0 + 0.1 * k for k, b in enumerate(BIOMARKERS)},
                       "sd": {b: 0.0 for b in BIOMARKERS}, "per_checkpoint": [], "trust": None,
                       "maps": {b: b for b in BIOMARKERS}}],
            "files": {}}


@pytest.fixture(scope="module")
def crop_and_maps():
    z, y, x = np.mgrid[:32, :32, :32] - 15.5
    r = np.sqrt(z**2 + y**2 + x**2)
    image = np.where(r < 6, 30, -850).astype(np.int16)
    padded = np.zeros((32, 32, 32), np.uint8)
    padded[:, :, :5] = 1
    image[padded.astype(bool)] = -1000
    crop = {"image": image, "padded": padded, "crop_to_world": np.eye(4)}
    rng = np.random.default_rng(0)
    maps = {t: (np.exp(-(r / 6) ** 2) * (1 + k) - 0.3 * rng.random((32, 32, 32))).astype(np.float32)
            for k, t in enumerate(["malignancy", *BIOMARKERS])}
    return crop, maps


@pytest.fixture()
def uncompressed_pdf():
    with matplotlib.rc_context({"pdf.compression": 0}):
        yield


def test_page_files_text_and_models(tmp_path, crop_and_maps, uncompressed_pdf):
    folds = []
    for k in range(3):
        (tmp_path / f"fold{k}").mkdir()
        folds.append(tmp_path / f"fold{k}" / "best.pt")
        folds[-1].write_bytes(b"checkpoint %d" % k)
    entry = entry_for(folds, trust={"percentile": 42.5, "per_model": [42.5, 10.0, 3.0], "threshold": 99.0,
                                    "unlike_training": False}, padded_share=5 / 32)
    crop, maps = crop_and_maps
    png, pdf = write_point_report(entry, crop, maps, tmp_path / "out", ratings={"malignancy": [4, 5, 4],
                                                                               "spiculation": 2},
                                  series="synthetic chest (CT/series)")
    assert png == tmp_path / "out" / "report.png" and pdf == tmp_path / "out" / "report.pdf"
    assert png.read_bytes().startswith(PNG_MAGIC) and pdf.read_bytes().startswith(b"%PDF")
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left
    text = pdf_text(pdf.read_bytes())
    assert RESEARCH_USE.lower() in text.lower() and RESEARCH_USE.upper() in text
    assert title_text(entry) in text and "point nodule_7 (like the training data)" in text
    assert "like the training data: 42.5th percentile of the training crops' distances (flagged above the 99th)" \
        in text and UNLIKE not in text
    assert "no training statistics" in text  # the biomarker model has none
    assert "15.6% of the crop lies outside the scan" in text  # 5 of 32 columns padded
    for f in folds:  # each checkpoint named with the first 16 hex digits of its SHA-256
        assert f"{sha256_of(f)[:16]}  fold{folds.index(f)}/best.pt" in text
    assert "malignancy: p = 0.710 \u00b1 0.04" in text and "diameter_mm: 3.7 mm" in text
    assert "4 (4, 5, 4)" in text and "Series: synthetic chest (CT/series)" in text
    assert b"/Subject (Research use, not for diagnostic use)" in pdf.read_bytes()


def test_a_flagged_point_and_a_shipped_model(tmp_path, crop_and_maps, uncompressed_pdf):
    shipped = shipped_checkpoint("phantom-malignancy")
    entry = entry_for([shipped], trust={"percentile": 99.8, "per_model": [99.8], "threshold": 99.0,
                                        "unlike_training": True}, padded_share=0.0, pid="p03")
    crop, maps = crop_and_maps
    del maps["texture"]  # a missing map: the panel says so, the page is still written
    _, pdf = write_point_report(entry, crop, maps, tmp_path, name="page")
    text = pdf_text(pdf.read_bytes())
    assert pdf.name == "page.pdf" and (tmp_path / "page.png").is_file()
    assert trust_state(entry) == UNLIKE and f"point p03 ({UNLIKE})" in text
    assert (f"{UNLIKE}: 99.8th percentile of the training crops' distances (flagged above the 99th): "
            f"{TRUST_CAUTION}") in text
    assert "outside the scan" not in text and "no map" in text
    assert f"{sha256_of(shipped)[:16]}  phantom-malignancy.pt (shipped phantom-malignancy)" in text


def test_trust_states_and_the_table():
    entry = entry_for(["a.pt"])
    assert trust_state(entry) == "no training statistics" and "(no training statistics)" in title_text(entry)
    rows = prediction_rows(entry, {"subtlety": 3})
    assert [r["target"] for r in rows] == ["malignancy", *BIOMARKERS]
    assert rows[0]["prediction"] == "p = 0.710" and rows[0]["sd"] == "-" and rows[1]["ratings"] == "3"
    assert rows[3]["prediction"] == "3.20 (1-5)" and rows[2]["prediction"] == "3.10 (1-6)"
    lines = table_lines(rows)
    assert len(lines) == 10 and lines[0].startswith("target")
    column = lines[0].index("prediction")
    assert all(line.index(r["prediction"]) == column for line, r in zip(lines[1:], rows, strict=True))


def test_the_training_data_the_phantom_line_and_the_flags_measured_rates(tmp_path, crop_and_maps, uncompressed_pdf):
    """A phantom-trained model's page says what it was trained on, carries the red phantom line, and quotes the
    flag's measured rates from the committed evaluation (TRUST_RATES.json)."""
    from lidc_cdam.models.demo_weights import load_shipped
    from lidc_cdam.models.provenance import PHANTOM_WARNING, measured_rates, training_data

    shipped = shipped_checkpoint("phantom-malignancy")
    entry = entry_for([shipped], trust={"percentile": 100.0, "per_model": [100.0], "threshold": 97.5,
                                        "unlike_training": True, "version": 2}, pid="p04")
    entry["training_data"] = training_data([load_shipped("phantom-malignancy"), load_shipped("phantom-biomarkers")])
    assert entry["training_data"]["kind"] == "phantom" and entry["training_data"]["phantom_warning"] == PHANTOM_WARNING
    crop, maps = crop_and_maps
    _, pdf = write_point_report(entry, crop, maps, tmp_path)
    text = pdf_text(pdf.read_bytes())
    assert PHANTOM_WARNING in text
    assert ("trained on synthetic phantoms (fold 0 of tiny-phantom-malignancy, 516 train / 173 val / 172 test "
            "nodules") in text
    in_domain, real = measured_rates("domain")
    assert (f"the flag flags {100 * in_domain:.0f} % of unseen training-like crops, {100 * real:.0f} % of "
            "real-CT crops") in text
    assert f"{UNLIKE}: 100th percentile of the training crops' distances (flagged above the 97.5th)" in text

    entry.pop("training_data")  # no training data known: no red line
    _, pdf = write_point_report(entry, crop, maps, tmp_path / "plain")
    assert PHANTOM_WARNING not in pdf_text(pdf.read_bytes())
