"""Evaluation of importance maps (paper section 3.4, docs/method.md, "Evaluation"): perturbation fidelity
(MIF/LIF), box sensitivity, compactness. Forward passes are batched and seeded."""

from lidc_cdam.evaluate.metrics import BOX_SIZES, ImageMetrics, evaluate_image
from lidc_cdam.evaluate.perturbation import (
    PERCENTS,
    box_sensitivity,
    compactness,
    gaussian_blur,
    perturbation_curves,
    sample_boxes,
    trapezoid,
)

__all__ = [
    "BOX_SIZES",
    "PERCENTS",
    "ImageMetrics",
    "box_sensitivity",
    "compactness",
    "evaluate_image",
    "gaussian_blur",
    "perturbation_curves",
    "sample_boxes",
    "trapezoid",
]
