"""Data sets and image reading.

- :mod:`.multi_digits` - the embedded two-digit images with masks and boxes (offline demo, tests, benchmark;
  re-exported here);
- :mod:`.images` - reading natural image files into model inputs;
- :mod:`.photos` - the real photographs scikit-image and matplotlib ship, as classes and X_multi-style composites
  (the ``real-photos`` benchmark);
- :mod:`.imagenet` - the ImageNet class order, X_val / X_multi manifest files and loaders (evaluation, linear probe);
- :mod:`.imagenet_subsets` - how X_val and X_multi are drawn from the ReaL labels (seeded; the synonym filter);
- :mod:`.lidc` - LIDC-IDRI: nodule table, folds, DICOM preprocessing to crops, phantoms, training datasets.
"""

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
