"""Radiological concepts (Eq. 3-4 from rated training nodules) and the LIDC cohort evaluation (issue 14).

Phantoms, not CT: the data are phantom nodules rendered from the LIDC annotations (a few scans), the models
the shipped phantom demo models or tiny random ViTs built here.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import images_for, tiny_vit
from lidc_cdam.pipelines.cli import main
from test_lidc_phantoms import phantom_dir

from lidc_cdam import Concept, explain
from lidc_cdam.ct.concepts import concept_targets
from lidc_cdam.data.lidc.concepts import ConceptError, concept_counts, read_concept_definitions
from lidc_cdam.evaluate.cohort import CohortSettings, run_cohort
from lidc_cdam.evaluate.localisation import ring_regions
from lidc_cdam.evaluate.metrics import evaluate_image, evaluate_targets
from lidc_cdam.evaluate.perturbation import box_masks, box_output_changes, gaussian_blur, sample_boxes

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "benchmarks" / "results" / "lidc-cohort"
CONCEPTS = ["spiculated", "spiculated-contrast", "lobulated", "lobulated-contrast", "calcified", "calcified-contrast",
            "solid", "solid-contrast", "round", "round-contrast"]


@functools.cache
def phantoms12() -> Path:
    """Phantoms of the first 12 scans with nodules: 20 nodules, 4 in test fold 0, 14 in its training part."""
    from lidc_cdam.data.lidc.phantoms import build_phantoms

    out = Path(tempfile.mkdtemp(prefix="lidc-phantoms12-"))
    build_phantoms(out, n_scans=12, progress=False)
    return out


def test_concept_definitions_and_the_committed_counts():
    concepts = read_concept_definitions()
    assert concepts.names() == CONCEPTS and concepts.similarity == "dot"
    assert str(concepts.concepts["spiculated"].high) == "spiculation >= 4"
    assert str(concepts.concepts["calcified"].high) == "calcification <= 5"
    committed = pd.read_csv(REPO / "data_manifest" / "lidc_concept_counts.csv")
    pd.testing.assert_frame_equal(concept_counts(), committed)
    assert (committed["n_high"] + committed["n_low"] == committed["n_train"]).all()


def test_bad_definitions_and_names_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("concepts:\n  spiky:\n    rating: spiculation\n    high: 'at least 4'\n    low: '< 4'\n")
    with pytest.raises(ConceptError, match=r"bad\.yaml.*spiky"):
        read_concept_definitions(bad)
    bad.write_text("concepts:\n  x:\n    rating: colour\n    high: '>= 4'\n    low: '< 4'\n")
    with pytest.raises(ConceptError, match="rating 'colour'"):
        read_concept_definitions(bad)
    with pytest.raises(ConceptError, match="unknown concept 'spiky'"):
        read_concept_definitions().definition("spiky")


def _folds_for(root: Path) -> pd.DataFrame:
    """Six phantom nodules: test fold 0 (2), validation fold 1 (1), training part the other 3."""
    ids = sorted(pd.read_csv(root / "nodules.csv")["nodule_id"])
    return pd.DataFrame({"nodule_id": ids, "fold": [0, 0, 1, 2, 3, 4]})


def test_concepts_are_mean_latents_of_the_training_part_only(tmp_path):
    """Eq. 3 through an independent route: the MONAI training transforms (checkpoint_dataset) and
    Concept.from_images over exactly the training-part nodules; contrasts subtract the low group."""
    from lidc_cdam.data.lidc.datasets import checkpoint_dataset
    from lidc_cdam.models.demo_weights import load_shipped

    root, folds = phantom_dir(), _folds_for(phantom_dir())
    definitions = tmp_path / "concepts.yaml"
    definitions.write_text("min_examples: 1\nconcepts:\n  big:\n    rating: diameter_mm\n    high: '>= 0'\n"
                           "    low: '< 0'\n  small:\n    rating: diameter_mm\n    high: '< 12'\n    low: '>= 12'\n")
    model = load_shipped("phantom-malignancy")
    (big,) = concept_targets(model, root, 0, ["big"], folds=folds, definitions=definitions)
    train = sorted(folds.loc[folds["fold"] >= 2, "nodule_id"])  # not test fold 0, not validation fold 1
    data = checkpoint_dataset(root, train, model.meta["input_stats"])
    images = torch.stack([data[i]["image"] for i in range(len(train))])
    assert big.name == "big" and big.similarity == "dot"
    torch.testing.assert_close(big.vector, Concept.from_images(model, images).vector, rtol=1e-5, atol=1e-5)
    table = pd.read_csv(root / "nodules.csv").set_index("nodule_id").loc[train]
    small_ids = table.index[table["diameter_mm"] < 12].tolist()
    if 0 < len(small_ids) < len(train):
        (contrast,) = concept_targets(model, root, 0, ["small-contrast"], folds=folds, definitions=definitions)
        latents = Concept.from_images(model, images[[train.index(i) for i in small_ids]]).vector - \
            Concept.from_images(model, images[[i for i, n in enumerate(train) if n not in small_ids]]).vector
        torch.testing.assert_close(contrast.vector, latents, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConceptError, match=r"big-contrast.*fewer than min_examples"):  # nothing is < 0 mm
        concept_targets(model, root, 0, ["big-contrast"], folds=folds, definitions=definitions)
    # the concept explains like any target
    maps = explain(model, images[:2], [big], method="cdam")
    assert maps.maps.shape == (2, 1, 16, 16) and maps.target_names[0] == ["big"]  # patch 4 on 64 px


def test_box_changes_of_several_outputs_equal_one_by_one():
    model = tiny_vit(torch.float64)
    image = images_for(model, 1)[0]
    blurred = gaussian_blur(image[None], 2.0)[0]
    masks = box_masks(sample_boxes((32, 32), 8, [1, 2, 3], 5, torch.Generator().manual_seed(0)), [1, 2, 3], 8,
                      (32, 32))
    score = lambda x: model(x).detach()  # noqa: E731
    changes, scale = box_output_changes(score, image, blurred, masks, [4, 1], return_scale=True)
    for i, record in enumerate([4, 1]):
        one, one_scale = box_output_changes(score, image, blurred, masks, record, return_scale=True)
        torch.testing.assert_close(changes[i], one)
        torch.testing.assert_close(scale[i], one_scale)


def test_evaluate_targets_equals_evaluate_image_target_by_target():
    """The cohort's shared-forward evaluation is the benchmark's metric, target by target (no second copy)."""
    model = tiny_vit(torch.float64)
    image = images_for(model, 1)[0]
    blurred = gaussian_blur(image[None], 2.0)[0]
    records = [2, 5, 0]
    attribution = explain(model, image[None], records, method="cdam")
    maps, native = attribution.upsample()[0], attribution.maps[0]
    kwargs = dict(patch=8, box_sizes=[1, 2, 3], n_boxes=12, percents=[0, 25, 50, 75])
    score = lambda x: model(x).detach()  # noqa: E731
    shared = evaluate_targets(score, image, blurred, {"cdam": maps}, records, native_maps={"cdam": native},
                              generator=torch.Generator().manual_seed(3), **kwargs)["cdam"]
    for k, record in enumerate(records):
        single = evaluate_image(score, image, blurred, {"cdam": maps[k]}, record, native_maps={"cdam": native[k]},
                                generator=torch.Generator().manual_seed(3), **kwargs)["cdam"]
        for field in ("a_mif", "a_lif", "a_box", "compactness"):
            assert getattr(shared[k], field) == pytest.approx(getattr(single, field), rel=1e-9, abs=1e-12)


def test_ring_regions_partition_the_plane():
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[0, 6:10, 6:10] = True  # second plane: no mask, no ring
    regions = ring_regions(mask, 3.0)
    total = regions["mask"].int() + regions["ring"].int() + regions["background"].int()
    assert (total == 1).all()
    assert regions["ring"][0, 3, 6] and regions["ring"][0, 8, 12] and not regions["ring"][0, 2, 6]
    assert not regions["ring"][0, 3, 3]  # the corner: sqrt(18) > 3 mm away
    assert not regions["ring"][1].any() and regions["background"][1].all()


def _cohort(out: Path, *extra: str) -> int:
    return main(["cohort", "--checkpoint", "phantom-malignancy", "phantom-biomarkers", "--data", str(phantoms12()),
                 "--out", str(out), "--method", "cdam", "attention", "--n-boxes", "8", "--batch-nodules", "2",
                 "--randomization-nodules", "2", "--no-progress", *extra])


@pytest.mark.slow
def test_a_cached_randomization_check_of_another_run_is_not_reused(tmp_path):
    """The randomisation check is cached in ``randomization.csv``: a folder without this run's ``run.json`` (a
    committed results folder, computed from the models shipped before) must not lend it its cache."""
    from lidc_cdam.evaluate.cohort_write import check_out

    cached = tmp_path / "randomization.csv"
    cached.write_text("method,stage\ncdam,head\n")
    check_out(tmp_path, "new", restart=False)
    assert not cached.exists()  # no run.json: the cache belongs to another run
    (tmp_path / "run.json").write_text(json.dumps({"fingerprint": "new"}))
    cached.write_text("method,stage\ncdam,head\n")
    check_out(tmp_path, "new", restart=False)
    assert cached.exists()  # the same run, resumed: kept
    check_out(tmp_path, "new", restart=True)
    assert not cached.exists()


def test_cohort_end_to_end_on_phantoms(tmp_path, capsys):
    out = tmp_path / "run"
    assert _cohort(out) == 0
    printed = capsys.readouterr().out
    assert "phantoms, not CT" in printed
    metrics = pd.read_csv(out / "metrics.csv")
    test_ids = {"LIDC-IDRI-0003_s0014_n02", "LIDC-IDRI-0004_s0015_n01", "LIDC-IDRI-0011_s0022_n10",
                "LIDC-IDRI-0016_s0027_n06"}  # fold 0 of the committed folds among the first 12 scans
    assert set(metrics["nodule_id"]) == test_ids and (metrics["fold"] == 0).all()
    concepts = pd.read_csv(out / "concepts.csv")
    used = sorted(concepts.loc[concepts["used"], "concept"])
    assert used == ["round", "round-contrast", "solid"]  # the others have fewer than 3 training examples here
    malignancy = metrics[metrics["model"] == "malignancy"]
    assert set(malignancy["target"]) == {"malignant", *used}  # concepts on the reference model only
    assert set(metrics.loc[metrics["model"] == "biomarkers", "target_kind"]) == {"output"}
    assert len(metrics) == 4 * 2 * (1 + 3 + 8)
    shares = metrics[["share_mask", "share_ring", "share_background"]].sum(axis=1)
    has_positive = shares > 0
    np.testing.assert_allclose(shares[has_positive], 1.0, atol=1e-5)
    np.testing.assert_allclose(metrics[["uniform_mask", "uniform_ring", "uniform_background"]].sum(axis=1), 1.0)
    # attention ignores the target: its maps correlate perfectly across targets of a model
    corr = pd.read_csv(out / "correlations.csv")
    assert set(corr["model"]) == {"malignancy", "biomarkers"} and (corr["reference"] == "malignant").all()
    same_model_attention = corr[(corr["method"] == "attention") & (corr["model"] == "malignancy")]
    np.testing.assert_allclose(same_model_attention["r"], 1.0, atol=1e-5)
    for name in ("tables.md", "tables/evidence_share.csv", "tables/faithfulness.csv", "tables/correlation.csv",
                 "tables/speed.csv", "tables/blur_baseline.csv", "figures/evidence_share.png",
                 "figures/correlation_heatmap.png", "randomization.csv", "concepts.pt", "metrics.parquet"):
        assert (out / name).exists(), name
    evidence = pd.read_csv(out / "tables" / "evidence_share.csv")
    row = evidence[(evidence["target"] == "malignant") & (evidence["method"] == "cdam")].iloc[0]
    assert row["share_mask_lo"] <= row["share_mask"] <= row["share_mask_hi"]
    speed = pd.read_csv(out / "tables" / "speed.csv")
    assert (speed["evaluate_ratio_to_lower_bound"] > 0.5).all() and (speed["explain_ratio_to_forward"] > 1).all()
    assert json.loads((out / "run.json").read_text())["phantoms"] is True

    # an interrupted run resumes to the same numbers
    partial = tmp_path / "partial"
    settings = CohortSettings(methods={"cdam": {}, "attention": {}}, n_boxes=8, batch_nodules=2,
                              randomization_nodules=2)
    checkpoints = ["phantom-malignancy", "phantom-biomarkers"]
    assert run_cohort(checkpoints, phantoms12(), partial, settings=settings, progress=False, max_parts=1) is None
    assert len(list((partial / "parts" / "fold0").glob("part_*.json"))) == 1
    run_cohort(checkpoints, phantoms12(), partial, settings=settings, progress=False)
    pd.testing.assert_frame_equal(pd.read_csv(partial / "metrics.csv"), metrics)

    # refusals, each naming what is wrong (exit code 2)
    assert _cohort(out, "--blur-mm", "3") == 2
    assert "holds results of another run" in capsys.readouterr().err
    assert _cohort(tmp_path / "other", "--folds", "1") == 2
    assert "no checkpoint for test fold(s) [1]" in capsys.readouterr().err
    assert _cohort(tmp_path / "other", "--concept", "spiculated") == 2
    assert "spiculated" in capsys.readouterr().err
    assert main(["cohort", "--checkpoint", "phantom-malignancy", "--data", str(tmp_path), "--out",
                 str(tmp_path / "x")]) == 2
    assert "nodules.csv" in capsys.readouterr().err


@pytest.mark.slow
def test_explain_command_takes_radiological_concepts(tmp_path):
    from PIL import Image

    from lidc_cdam.models.demo_weights import shipped_checkpoint

    png = tmp_path / "slice.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(png)
    out = tmp_path / "out"
    assert main(["explain", str(png), "--checkpoint", str(shipped_checkpoint("phantom-malignancy")), "--concept",
                 "round", "solid", "--concept-data", str(phantoms12()), "--out", str(out), "--no-figures"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"][0]["targets"] == ["round", "solid"]


@pytest.mark.committed_results
def test_committed_tables_and_figures_are_rebuilt_from_the_committed_rows(tmp_path):
    """The committed summary tables, ``tables.md``, ``summary.json`` and both figures come from the committed per-nodule
    rows (``metrics``, ``correlations``, ``timing``, ``randomization``): rebuilt here, they are the same (the tables
    to 1e-9, the figures as images of the committed size)."""
    from PIL import Image

    from lidc_cdam.evaluate.cohort_report import write_cohort_report

    settings = json.loads((COMMITTED / "settings.json").read_text())
    run = {**settings, "note": "phantoms, not CT", "phantoms": True}
    read = lambda name: pd.read_parquet(COMMITTED / f"{name}.parquet") if (COMMITTED / f"{name}.parquet").exists() \
        else pd.read_csv(COMMITTED / f"{name}.csv")  # noqa: E731
    write_cohort_report(tmp_path, read("metrics"), read("correlations"), read("timing"),
                        pd.read_csv(COMMITTED / "randomization.csv"), run)
    for table in sorted((COMMITTED / "tables").glob("*.csv")):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "tables" / table.name), pd.read_csv(table),
                                      check_exact=False, rtol=1e-9, atol=1e-12)
    assert (tmp_path / "tables.md").read_text() == (COMMITTED / "tables.md").read_text()
    for figure in ("evidence_share.png", "correlation_heatmap.png"):
        with Image.open(tmp_path / "figures" / figure) as fresh, Image.open(COMMITTED / "figures" / figure) as kept:
            assert fresh.size == kept.size
