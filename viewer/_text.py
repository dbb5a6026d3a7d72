"""The widget's words: predictions (ensemble mean +- sd, radiologists' ratings), the trust flag, and the
predictions on the slice of the 2.5D stack under the slider. Plain functions, no Qt."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lidc_cdam.ct.checkpoint import MALIGNANCY


def _known(value: Any) -> bool:
    try:
        return value is not None and not np.isnan(float(value))
    except (TypeError, ValueError):
        return False


def _value(name: str, mean: float, sd: float | None, n: int) -> str:
    head = f"p = {mean:.2f}" if name == MALIGNANCY else f"{mean:.2f}"
    return head + (f" +- {sd:.2f} ({n} folds)" if n > 1 and sd is not None else "")


def _ratings(name: str, row: Mapping[str, Any]) -> str:
    if name == MALIGNANCY:
        ref, median = row.get("label_name"), row.get("malignancy_median")
        if not ref:
            return ""
        return f" (radiologists: {ref}" + (f", median {float(median):g}" if _known(median) else "") + ")"
    ref = row.get(name)
    return f" (radiologists {float(ref):.1f})" if _known(ref) else ""


def trust_line(trust: Mapping[str, Any] | None, task: str) -> tuple[str, bool]:
    """``(text, warn)`` for a task's trust flag (:func:`lidc_cdam.ct.ensemble.crop_trust`), in the words of
    :func:`lidc_cdam.models.provenance.trust_warning` (percentile, threshold, measured rates)."""
    from lidc_cdam.models.provenance import trust_warning

    if not trust:
        return f"{task}: no training statistics in the checkpoint(s), no trust flag", False
    text = f"{task}: {trust_warning(dict(trust))}"
    if trust.get("unlike_training"):
        return f"WARNING {text}", True
    return text, False


def training_text(ensembles: Sequence[Any]) -> tuple[str, str | None]:
    """``(one provenance line per distinct model, the phantom warning or None)`` of the ensembles' checkpoints
    (:mod:`lidc_cdam.models.provenance`)."""
    from lidc_cdam.ct.ensemble import as_loaded
    from lidc_cdam.models.provenance import provenance_line, provenance_of, training_data

    models = [as_loaded(c).model for e in ensembles for c in e.checkpoints]
    if not models:
        return "", None
    lines = list(dict.fromkeys(provenance_line(provenance_of(m)) for m in models))
    warning = training_data(models)["phantom_warning"]
    return "\n".join(lines), (f"The model was {warning}" if warning else None)


def prediction_text(ensembles: Sequence[Any], row: Mapping[str, Any] | None = None,
                    slice_index: int | None = None, padded_share: float = 0.0) -> tuple[str, list[str]]:
    """The predictions panel and the warnings to raise: the central slice's predictions per target (ensemble
    mean +- sd over the folds, the radiologists' ratings where the nodule table knows them), the trust flag per
    task, and the predictions on crop slice ``slice_index`` along the view when it was explained."""
    row = row or {}
    lines: list[str] = []
    warnings: list[str] = []
    for ens in ensembles:
        for t in ens.targets:
            lines.append(f"{t}: {_value(t, ens.mean[t], ens.sd.get(t), ens.n)}{_ratings(t, row)}")
    if not lines:
        return "", warnings
    volumes = [e.view == "3d" for e in ensembles]
    lines.append("(the whole 32 mm crop: 3D model)" if all(volumes) else
                 "(2D models: the crop's central slice; 3D models: the whole crop)" if any(volumes) else
                 "(central slice of the crop)")
    for ens in ensembles:
        text, warn = trust_line(ens.trust, ens.task)
        lines.append(text)
        if warn:
            warnings.append(text)
    if padded_share > 0.05:
        text = f"WARNING: {100 * padded_share:.0f} % of the 32 mm crop lies outside the scan (filled with air)"
        lines.append(text)
        warnings.append(text)
    if slice_index is not None and any(e.slice_mean is not None for e in ensembles):  # 2.5D (a 3D model: none)
        here = []
        for ens in ensembles:
            if ens.slice_mean is None:
                continue
            at = ens.predictions_at(slice_index)
            if at is None:
                continue
            mean, sd = at
            here += [f"{t} {_value(t, mean[t], sd.get(t), ens.n)}" for t in ens.targets]
        if here:
            lines.append(f"this slice (crop slice {slice_index}): " + "; ".join(here))
        else:
            lines.append(f"this slice (crop slice {slice_index}): not explained")
    return "\n".join(lines), warnings
