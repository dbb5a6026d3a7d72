"""A scan's values as HU: int16, invalid voxels (NaN, +-inf) masked, implausible HU warned about.

Every reader of :mod:`lidc_cdam.ct` turns its source values into HU here:

- :func:`to_hu` rounds to int16 (values beyond int16 clipped and counted); a NaN or infinite value is stored as
  ``INVALID_HU`` (-1000, air) and marked True in the returned mask, which becomes :attr:`CTVolume.invalid`;
- :func:`value_warnings` says how many voxels were invalid or clipped, and warns (never refuses) when the HU do
  not look like a CT: more than ``LOW_SHARE`` (half) of the valid voxels below ``LOW_HU`` (-1100; air is
  -1000, so only padding or values that are not HU lie below), more than ``HIGH_SHARE`` (1 %) above
  ``HIGH_HU`` (4000; dense metal, a few voxels at most), or, with ``expect_air``, no voxel below -200 (a
  chest CT has air; for files without a modality);
- :func:`set_warnings`: ``meta["warnings"]`` (always a list) and ``meta["warning"]``, their "; " join.
"""

from __future__ import annotations

from typing import Any

import numpy as np

INVALID_HU = -1000  # what a NaN / infinite voxel is stored as (air), marked in the invalid mask
LOW_HU, LOW_SHARE = -1100, 0.5
HIGH_HU, HIGH_SHARE = 4000, 0.01
AIR_HU = -200  # with expect_air: no voxel below this and the values may not be HU


def to_hu(values: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, int]:
    """``(hu int16, invalid mask or None, voxels clipped to the int16 range)`` of values already in HU units."""
    values = np.asarray(values)
    if values.dtype == np.int16:
        return values, None, 0
    if values.dtype.kind in "iub":
        clipped = int(np.count_nonzero((values < -32768) | (values > 32767))) if values.dtype.itemsize > 1 else 0
        return np.clip(values, -32768, 32767).astype(np.int16), None, clipped
    values = values.astype(np.float64, copy=False)
    bad = ~np.isfinite(values)
    invalid = bad if bad.any() else None
    if invalid is not None:
        values = np.where(invalid, float(INVALID_HU), values)
    clipped = int(np.count_nonzero((values < -32768.5) | (values > 32767.5)))
    return np.clip(np.rint(values), -32768, 32767).astype(np.int16), invalid, clipped


def value_warnings(hu: np.ndarray, invalid: np.ndarray | None = None, clipped: int = 0,
                   expect_air: bool = False) -> list[str]:
    """The warnings of the module docstring about ``hu`` (int16) and its invalid mask."""
    out: list[str] = []
    n_invalid = int(np.count_nonzero(invalid)) if invalid is not None else 0
    if n_invalid:
        out.append(f"{n_invalid} voxel(s) NaN or infinite in the source ({100.0 * n_invalid / hu.size:.2g} %): "
                   f"stored as {INVALID_HU} HU and marked invalid")
    if clipped:
        out.append(f"{clipped} voxel(s) beyond the int16 range clipped to -32768 .. 32767")
    valid = hu[~invalid] if n_invalid else hu
    if not valid.size:
        return out
    low = np.count_nonzero(valid < LOW_HU) / valid.size
    high = np.count_nonzero(valid > HIGH_HU) / valid.size
    if low > LOW_SHARE:
        out.append(f"{100 * low:.0f} % of the voxels below {LOW_HU} HU (air is -1000): the values may not be "
                   "Hounsfield units")
    if high > HIGH_SHARE:
        out.append(f"{100 * high:.1f} % of the voxels above {HIGH_HU} HU (denser than bone): the values may not "
                   "be Hounsfield units")
    if expect_air and int(valid.min()) > AIR_HU:
        out.append(f"no value below {AIR_HU} (range {int(valid.min())} .. {int(valid.max())}): these may not be "
                   "Hounsfield units")
    return out


def set_warnings(meta: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    """``meta["warnings"]`` = ``warnings`` and, when there are any, ``meta["warning"]`` their "; " join."""
    meta["warnings"] = list(warnings)
    if warnings:
        meta["warning"] = "; ".join(warnings)
    else:
        meta.pop("warning", None)
    return meta
