"""Evaluation of importance maps (paper section 3.4; docs/method.md, "Evaluation").

- :mod:`.perturbation` - the blur, MIF / LIF curves, boxes and their areas, compactness;
- :mod:`.metrics` - every metric of images for several methods and targets, sharing the box forwards;
- :mod:`.localisation` - evidence on known object masks, rings, the pointing game;
- :mod:`.randomization` - the cascading model-randomisation check;
- :mod:`.benchmark_config` - the benchmark's YAML configuration, checked when read;
- :mod:`.image_sets` - the image sets a benchmark runs on;
- :mod:`.runner` - the benchmark runner: methods x images x targets into tidy tables, resumable, sharded;
- :mod:`.report` - tables in the paper's layout and curve plots;
- :mod:`.paper_tables` - the paper's values beside a benchmark's, rank agreement;
- :mod:`.cohort` - the LIDC cohort evaluation: :mod:`.cohort_plan` (settings, checkpoints, folds, concepts),
  :mod:`.cohort_compute` (maps and metrics), :mod:`.cohort_write` (its files), :mod:`.cohort_report` (tables, figures);
- :mod:`.cause_regions` - the ground truth for per-target maps: evidence in each target's own cause region on
  phantoms, pointing game, discrimination against the other targets' regions; :mod:`.cause_report` (its tables,
  figures);
- :mod:`.trust_shift` - the trust flag measured on a real change of domain.

Forward passes are batched and seeded.
"""

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
