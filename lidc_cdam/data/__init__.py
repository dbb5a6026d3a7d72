"""Data sets: the embedded multi-digit images (offline demo, tests, benchmark)."""

from lidc_cdam.data.multi_digits import (
    MEAN,
    NUM_CLASSES,
    STD,
    MultiDigits,
    box_masks,
    denormalize,
    digit_pool,
    make_multi_digits,
    normalize,
)

__all__ = [
    "MEAN",
    "NUM_CLASSES",
    "STD",
    "MultiDigits",
    "box_masks",
    "denormalize",
    "digit_pool",
    "make_multi_digits",
    "normalize",
]
