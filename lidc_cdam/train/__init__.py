"""Training: the embedded multi-digit demo model."""

from lidc_cdam.train.digits import (
    DigitsTrainConfig,
    cdam_class_discrimination,
    demo_model_path,
    digits_test_set,
    evaluate_digits,
    load_or_train_demo_model,
    train_digits_vit,
)

__all__ = [
    "DigitsTrainConfig",
    "cdam_class_discrimination",
    "demo_model_path",
    "digits_test_set",
    "evaluate_digits",
    "load_or_train_demo_model",
    "train_digits_vit",
]
