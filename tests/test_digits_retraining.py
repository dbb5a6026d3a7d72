"""Retraining the shipped digits model with the same code still reaches its quality bars (a module of its own: the
longest test, so that the parallel workers share the rest of the suite beside it)."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_retraining_the_digits_model_reaches_the_quality_bars():
    """The same code trains afresh (about two minutes): the bars, not equality (training differs by CPU)."""
    from lidc_cdam.train.digits import DigitsTrainConfig, train_digits_vit

    _, report = train_digits_vit(DigitsTrainConfig(), progress=False)
    assert report["test_metrics"]["top2_accuracy"] >= 0.85, report["test_metrics"]
    assert report["test_metrics"]["label_accuracy"] >= 0.96, report["test_metrics"]
