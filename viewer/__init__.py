"""napari plugin for lidc-cdam: per-target CDAM overlays on CT slices, in the scan's own coordinates.

A thin napari layer over :mod:`lidc_cdam.ct` (reading scans, nodules, model inputs, maps, placing them on
the CT grid, every output file, the synthetic sample scan), which imports no GUI toolkit. Here, with napari and
Qt (the ``viewer`` extra): :mod:`._reader`, :mod:`._sample_data`, :mod:`._widget` (the npe2 contributions, see
``napari.yaml``), :func:`open_viewer` (:mod:`.app`), :mod:`.screenshot` and :mod:`.benchmark`; :mod:`._guard`
imports torch's stack safely beside napari's OpenGL context.

The dock widget (:mod:`._widget`) is a Qt-free controller, :mod:`._controller` (state and actions: the scan, the
models, the points, what is explained, export; no napari, Qt or magicgui import), and small magicgui panels bound
to it: :mod:`._scan_panel` (scan, models), :mod:`._where_panel` (points, table nodules), :mod:`._display_panel`
(overlays, predictions, training data), :mod:`._pacs_panel` (the PACS: search, open, send; its Qt-free actions
in :mod:`._pacs`); :mod:`._overlays`, :mod:`._points` and :mod:`._text` are their napari layers and words.
"""

from __future__ import annotations

from typing import Any

__all__ = ["open_viewer"]


def open_viewer(*args: Any, **kwargs: Any):
    """napari on a scan with the CDAM widget (see :func:`lidc_cdam.viewer.app.open_viewer`)."""
    from lidc_cdam.viewer.app import open_viewer as _open

    return _open(*args, **kwargs)
