"""The LIDC cohort evaluation (issue 14): are the maps on the nodule, faithful on the crops, and do the
malignancy model's evidence and the biomarkers' and concepts' evidence co-locate?

Over the test nodules of each fold, for every checkpoint of that fold, every target (the model's
outputs and, on the reference model, the radiological concepts of :mod:`lidc_cdam.data.lidc.concepts`,
Eq. 3-4, from the fold's training part) and every method, on the central slice of each crop:

* evidence share: :func:`~lidc_cdam.evaluate.localisation.positive_share_in_mask` in the consensus
  mask, in a ``ring_mm`` ring around it and in the background, beside the area share a uniform map
  would give; the pointing game on the mask;
* MIF / LIF and box sensitivity (:func:`~lidc_cdam.evaluate.metrics.evaluate_targets`, the boxes'
  forwards shared by every method and target), the blurred baseline made in HU on the crop's 1 mm
  plane (Gaussian, ``blur_mm``) and then passed through the checkpoint's input transforms; compactness;
* the Pearson correlation, per nodule and method, of the reference map (``malignant``) with every other
  target's map;
* the cascading randomisation check (:mod:`~lidc_cdam.evaluate.randomization`);
* on phantoms, whose crops carry each biomarker's cause region, the ground-truth test of the per-target maps:
  evidence share and pointing game in the target's own cause region, discrimination against the other targets'
  regions (:mod:`~lidc_cdam.evaluate.cause_regions`, columns of the metric rows; the report
  :mod:`~lidc_cdam.evaluate.cause_report` in ``OUT/causes/`` or ``causes_out``).

Nodules are processed in parts of ``batch_nodules`` per fold; each part's rows are written atomically
(``parts/fold<k>/part_NNNNN.*``, the ``.json`` last as its done-marker), so an interrupted run resumes.
A checkpoint is only evaluated on the test fold it records (``meta["fold"]``): its training nodules
never enter its results. Tables and figures: :mod:`lidc_cdam.evaluate.cohort_report`.

This module runs it (:func:`run_cohort`); the jobs are in :mod:`.cohort_plan` (settings, checkpoints, folds,
concepts), :mod:`.cohort_compute` (maps, metrics, correlations, randomisation) and :mod:`.cohort_write` (the
files), whose public names are importable from here too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from lidc_cdam.data.lidc.concepts import read_concept_definitions
from lidc_cdam.data.lidc.folds import read_folds
from lidc_cdam.data.lidc.nodule_inputs import load_planes, read_data_table
from lidc_cdam.device import resolve_device
from lidc_cdam.evaluate.cohort_compute import (
    CountingScore,
    blur_planes,
    correlation_rows,
    evaluate_part,
    explain_all,
    model_regions,
    nodule_seed,
    randomization_rows,
)
from lidc_cdam.evaluate.cohort_plan import (
    COHORT_METHODS,
    PHANTOM_WARNING,
    REGIONS,
    CohortError,
    CohortModel,
    CohortSettings,
    attach_concepts,
    fingerprint,
    load_cohort_models,
    load_concepts,
    plan_folds,
    reference_model,
)
from lidc_cdam.evaluate.cohort_write import (
    check_out,
    finish,
    merge_parts,
    randomization_check,
    save_concepts,
    write_part,
)
from lidc_cdam.explain.api import METHODS
from lidc_cdam.io import atomic_write, write_json
from lidc_cdam.resources import manifest_path

__all__ = [
    "COHORT_METHODS",
    "PHANTOM_WARNING",
    "REGIONS",
    "CohortError",
    "CohortModel",
    "CohortSettings",
    "CountingScore",
    "attach_concepts",
    "blur_planes",
    "correlation_rows",
    "evaluate_part",
    "explain_all",
    "fingerprint",
    "load_cohort_models",
    "load_concepts",
    "merge_parts",
    "model_regions",
    "nodule_seed",
    "plan_folds",
    "randomization_check",
    "randomization_rows",
    "reference_model",
    "run_cohort",
    "save_concepts",
]


def run_cohort(checkpoints: Sequence[str | Path], data_root: str | Path, out: str | Path, *,
               folds: Sequence[int] | None = None, settings: CohortSettings | None = None,
               folds_table: str | Path | None = None, restart: bool = False, progress: bool = True,
               device: str | torch.device | None = "cpu", max_parts: int | None = None,
               concepts_from: str | Path | None = None, causes_out: str | Path | None = None
               ) -> dict[str, Any] | None:
    """Run (or resume) the cohort evaluation into ``out``; returns the summary (``None`` when ``max_parts``
    stopped it early, which tests use to simulate an interruption). ``concepts_from``: the ``concepts.pt``
    of an earlier run, whose concept vectors are used instead of recomputing them from the training part
    (to reproduce a run on a subset of its data). ``causes_out``: the folder of the cause report (default
    ``out / "causes"``; written only where the crops carry cause regions)."""
    settings = settings or CohortSettings()
    unknown = sorted(set(settings.methods) - set(METHODS))
    if unknown:
        raise CohortError(f"unknown method(s) {unknown}; available: {', '.join(METHODS)}")
    out, data_root, device = Path(out), Path(data_root), resolve_device(device)
    models = load_cohort_models(checkpoints)
    plan = plan_folds(models, folds)
    if folds_table is not None and not Path(folds_table).is_file():
        raise CohortError(f"{folds_table}: no such folds table")
    fold_df = read_folds(folds_table)
    table = read_data_table(data_root, fold_df)
    concepts_file = str(manifest_path("lidc_concepts.yaml"))
    read_concept_definitions(concepts_file)
    fixed = load_concepts(concepts_from) if concepts_from is not None else None
    stamp = fingerprint(models, settings, data_root, fold_df, concepts_file, concepts_from)
    check_out(out, stamp, restart)
    phantom = "source" in table.columns and (table["source"].astype(str) == "phantom").all()
    write_json(out / "run.json", {
        "fingerprint": stamp, "data": str(data_root), "phantoms": bool(phantom),
        "note": PHANTOM_WARNING if phantom else "CT crops",
        "checkpoints": [{"name": m.name, "source": m.source, "sha256": m.sha256, "fold": m.fold} for m in models],
        "folds": list(plan), "settings": settings.to_dict()})
    # the settings alone (no local paths) are committed with the tables: what a rerun needs
    write_json(out / "settings.json", {"settings": settings.to_dict(), "folds": list(plan),
                                       "checkpoints": [{"name": m.name, "sha256": m.sha256, "fold": m.fold}
                                                       for m in models]})
    for m in models:
        m.model.to(device).eval()
    done_here, concept_counts, vectors = 0, [], {}
    for fold, fold_models in plan.items():
        test = table[table["fold"] == fold].sort_values("nodule_id").reset_index(drop=True)
        if test.empty:
            raise CohortError(f"{data_root / 'nodules.csv'}: no test nodules of fold {fold}")
        concept_counts.append(attach_concepts(fold_models, fold, data_root, table, settings, fixed,
                                              str(concepts_from)))
        vectors.update({f"fold{fold}/{cm.name}": list(cm.concepts) for cm in fold_models})
        labels = dict(zip(test["nodule_id"], test["label"].astype(float), strict=True)) if "label" in test else {}
        folder = out / "parts" / f"fold{fold}"
        n_parts = math.ceil(len(test) / settings.batch_nodules)
        todo = [p for p in range(n_parts) if not (folder / f"part_{p:05d}.json").exists()]
        bar = tqdm(todo, desc=f"fold {fold} ({len(test)} nodules)", unit="part", disable=not progress)
        for part in bar:
            if max_parts is not None and done_here >= max_parts:
                return None
            rows = test.iloc[part * settings.batch_nodules:(part + 1) * settings.batch_nodules]
            start = time.perf_counter()
            planes = load_planes(data_root, rows, fold_models[0].stats["view"])
            metrics, correlations, timing = evaluate_part(fold_models, planes, labels, fold, settings, device)
            write_part(folder, part, metrics, correlations, {**timing, "nodule_ids": list(rows["nodule_id"]),
                                                             "seconds": time.perf_counter() - start})
            done_here += 1
    counts = pd.concat(concept_counts, ignore_index=True)
    atomic_write(out / "concepts.csv", lambda tmp: counts.to_csv(tmp, index=False))
    save_concepts(out / "concepts.pt", vectors)
    return finish(out, plan, table, settings, device, fixed, str(concepts_from),
                  None if causes_out is None else Path(causes_out))
