"""napari plugin for lidc-cdam: per-target CDAM overlays on CT slices, in the scan's own coordinates.

The core modules import no GUI toolkit: :mod:`.volume` (reading DICOM / LIDC scans, napari geometry),
:mod:`.maps` (2.5D maps of a nodule, placing them on the CT grid, cache, NIfTI export), :mod:`.synthetic`
(the sample scan with phantom nodules). napari and Qt (the ``viewer`` extra) are needed by
:mod:`._reader`, :mod:`._sample_data`, :mod:`._widget` (the npe2 contributions, see ``napari.yaml``),
:func:`open_viewer` and :mod:`.screenshot`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["open_viewer"]


def open_viewer(*args: Any, **kwargs: Any):
    """napari on a scan with the CDAM widget (see :func:`lidc_cdam.viewer.app.open_viewer`)."""
    from lidc_cdam.viewer.app import open_viewer as _open

    return _open(*args, **kwargs)
