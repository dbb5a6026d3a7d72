"""Model inputs of the CT path: which slices of a crop are explained, and the model-input contract's array forms.

:func:`slices_for` chooses the slices (through the nodule +- a margin, or all). :func:`model_inputs`,
:func:`volume_input`, :func:`slice_plane` and the constants are :mod:`lidc_cdam.data.lidc.model_input`'s (the one
contract that training's MONAI transforms wrap), re-exported here for the CT path's modules.
"""

from __future__ import annotations

import numpy as np

from lidc_cdam.data.lidc.model_input import (  # the one model-input contract, re-exported for the CT path
    CENTRE,
    VIEWS,
    VOLUME,
    model_inputs,
    slice_plane,
    volume_input,
)

__all__ = ["CENTRE", "VIEWS", "VOLUME", "model_inputs", "slice_plane", "slices_for", "volume_input"]


def slices_for(mask: np.ndarray, view: str, mode: str = "nodule", margin: int = 3) -> list[int]:
    """Which crop slices to explain: ``"all"`` 32, or ``"nodule"``: where the mask is non-empty +- margin
    (always including the centre)."""
    if mode == "all":
        return list(range(mask.shape[VIEWS[view]]))
    if mode != "nodule":
        raise ValueError(f"slices must be 'nodule' or 'all', got {mode!r}")
    axes = tuple(a for a in range(3) if a != VIEWS[view])
    present = np.flatnonzero(np.asarray(mask).any(axis=axes))
    n = mask.shape[VIEWS[view]]
    lo, hi = (int(present.min()), int(present.max())) if present.size else (CENTRE, CENTRE)
    lo, hi = min(lo, CENTRE), max(hi, CENTRE)
    return list(range(max(0, lo - margin), min(n, hi + margin + 1)))
