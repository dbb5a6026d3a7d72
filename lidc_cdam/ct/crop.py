"""A nodule's 32 mm crop at 1 mm (the ``.npz`` files of :mod:`lidc_cdam.data.lidc.crops`) as the CT tools read it.

The crops themselves are cut by :mod:`lidc_cdam.data.lidc.crops` (``lidc-cdam preprocess``, ``phantoms``, the
synthetic scan); here they are read back with a clear error, and located in patient millimetres.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lidc_cdam.ct.errors import CTError
from lidc_cdam.data.lidc.crops import CROP
from lidc_cdam.data.lidc.crops import read_crop as _read


def read_crop(path: str | Path) -> dict[str, Any]:
    """A crop file as a dict (:func:`lidc_cdam.data.lidc.crops.read_crop`); :class:`CTError` when unreadable."""
    try:
        return _read(path)
    except (OSError, ValueError, KeyError) as err:
        raise CTError(f"{path}: not a readable crop file ({err})") from None


def crop_centre_world(crop: dict[str, Any]) -> np.ndarray:
    """The crop's centre in patient mm (x, y, z)."""
    c = (CROP - 1) / 2.0
    return (np.asarray(crop["crop_to_world"], dtype=float) @ np.array([c, c, c, 1.0]))[:3]
