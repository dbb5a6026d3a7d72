"""The committed LIDC cohort run (``benchmarks/results/lidc-cohort/``) recomputed with the shipped phantom models.

Its own module (the heaviest cohort test) so that xdist's ``--dist loadscope`` runs it beside the rest of
``test_cohort.py`` rather than after it on the same worker.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from helpers import KERNEL_SUBSET
from test_cohort import COMMITTED
from test_lidc_phantoms import phantom_dir

from lidc_cdam.data.lidc.folds import read_folds
from lidc_cdam.evaluate.cohort import CohortSettings, run_cohort


@pytest.mark.slow
@pytest.mark.committed_results
def test_committed_phantom_results_are_reproduced(tmp_path):
    """The committed run's rows of the fold-0 test nodules among the first 4 scans, recomputed with the shipped
    models, every method and the committed concept vectors, equal the committed table (rel / abs 1e-3).

    Under the kernel-set check (``KERNEL_SUBSET``): the malignancy model's rows (its output and the ten concepts)
    of one nodule for three methods (gradients, integrated gradients over 50 steps, relevance propagation); a row
    depends on no other nodule, model or method (seeded methods are seeded per nodule, boxes per nodule)."""
    run = json.loads((COMMITTED / "settings.json").read_text())  # run.json (local paths) is not committed
    methods = run["settings"]["methods"]
    nodules = ["LIDC-IDRI-0003_s0014_n02", "LIDC-IDRI-0004_s0015_n01"]
    checkpoints, targets, folds_table = ["phantom-malignancy", "phantom-biomarkers"], 1 + 10 + 8, None
    if KERNEL_SUBSET:
        methods = {m: methods[m] for m in ("cdam", "integrated-cdam", "relevance-propagation")}
        checkpoints, targets = checkpoints[:1], 1 + 10
        folds = read_folds()
        folds.loc[folds["nodule_id"].isin(nodules[1:]), "fold"] = 1  # the other nodule leaves test fold 0
        nodules, folds_table = nodules[:1], tmp_path / "folds.csv"
        folds.to_csv(folds_table, index=False)
    settings = CohortSettings(**{**run["settings"], "methods": methods, "randomization_nodules": 0, "percents":
                                 tuple(run["settings"]["percents"]), "box_sizes": run["settings"]["box_sizes"]
                                 and tuple(run["settings"]["box_sizes"]),
                                 "concepts": run["settings"]["concepts"] and tuple(run["settings"]["concepts"])})
    run_cohort(checkpoints, phantom_dir(), tmp_path / "run", settings=settings, progress=False,
               concepts_from=COMMITTED / "concepts.pt", folds_table=folds_table)
    keys = ["fold", "nodule_id", "model", "target", "method"]
    fresh = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert set(fresh["nodule_id"]) == set(nodules)
    committed = pd.read_csv(COMMITTED / "metrics.csv")
    merged = fresh.merge(committed, on=keys, suffixes=("", "_committed"))
    assert len(merged) == len(fresh) == len(nodules) * len(methods) * targets
    for column in ("target_value", "share_mask", "share_ring", "pointing_hit", "a_mif", "a_lif", "a_box",
                   "compactness"):
        np.testing.assert_allclose(merged[column], merged[f"{column}_committed"], rtol=1e-3, atol=1e-3,
                                   err_msg=column)
    corr = pd.read_csv(tmp_path / "run" / "correlations.csv").merge(
        pd.read_csv(COMMITTED / "correlations.csv"), on=["nodule_id", "method", "model", "target"],
        suffixes=("", "_committed"))
    assert len(corr) == len(nodules) * len(methods) * (targets - 1)
    np.testing.assert_allclose(corr["r"], corr["r_committed"], rtol=1e-3, atol=1e-3)
