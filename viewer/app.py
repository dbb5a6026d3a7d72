"""``open_viewer``: napari on a scan with the CDAM widget docked and (optionally) the maps computed.

For ``lidc-cdam demo --viewer`` and scripts::

    from lidc_cdam.viewer import open_viewer
    viewer, widget = open_viewer("LIDC-IDRI/LIDC-IDRI-0078/...", "preprocessed/", "runs/fold0/best.pt")
    napari.run()  # or open_viewer(..., run=True)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lidc_cdam.viewer._guard import prepare_torch

from lidc_cdam.ct.errors import CTError
from lidc_cdam.ct.volume import CTVolume


def _as_volume(scan: Any) -> tuple[CTVolume, str | None]:
    from lidc_cdam.ct.volume import read_dicom_folder

    if isinstance(scan, CTVolume):
        return scan, None
    if scan is None or str(scan) == "synthetic":
        from lidc_cdam.ct.synthetic import synthetic_data

        paths = synthetic_data()
        volume = read_dicom_folder(paths["dicom"])
        volume.name = "CT synthetic chest (phantom nodules, not CT)"
        return volume, str(paths["crops_dir"])
    if isinstance(scan, str | Path):
        from lidc_cdam.ct.read import read_ct

        return read_ct(scan), None
    raise CTError("open_viewer takes a DICOM folder or file, a NIfTI file, a CTVolume or 'synthetic', "
                  f"not {type(scan).__name__}")


def open_viewer(scan_folder_or_volume: Any = "synthetic", crops_dir: str | Path | None = None,
                checkpoint: str | Path | Sequence[str | Path] | None = None, *, nodule: str | None = None,
                points: Sequence[Sequence[float]] | None = None, models_shown: str | None = None,
                targets: Sequence[str] | None = None, method: str = "CDAM", view: str | None = None,
                compute: bool = True, show: bool = True, run: bool = False, viewer: Any = None) -> tuple[Any, Any]:
    """Open napari on a scan with the CDAM widget; returns ``(viewer, widget)``.

    ``scan_folder_or_volume``: a DICOM series folder or a NIfTI file (:func:`lidc_cdam.ct.read_ct`), a
    :class:`~lidc_cdam.ct.volume.CTVolume` or ``"synthetic"`` (the sample scan, whose crops folder is used
    when ``crops_dir`` is None).
    ``crops_dir``: the preprocessed folder (``nodules.csv`` + ``crops/``). ``checkpoint``: one or more
    ``best.pt`` files. ``nodule`` (an id; default the first nodule of the scan), ``targets`` (default all
    the checkpoints' targets), ``method`` (a widget label: "CDAM", "Smooth CDAM", "Integrated CDAM",
    "Attention map"), ``view`` (default the model's). ``points``: points to explain instead of a table nodule
    (patient mm, DICOM LPS x, y, z; the last one is explained); ``models_shown`` for fold ensembles: "ensemble
    mean", "sign agreement of the folds" or "fold k". With ``compute`` the maps are computed at once
    (in this thread when ``show`` is False, else in the widget's worker). ``run`` starts napari's event
    loop (blocks until the window closes). Raises :class:`CTError` for bad input.
    """
    prepare_torch()
    import napari
    from lidc_cdam.viewer._widget import CdamWidget

    volume, default_crops = _as_volume(scan_folder_or_volume)
    crops_dir = crops_dir if crops_dir is not None else default_crops
    viewer = viewer if viewer is not None else napari.Viewer(show=show, title="lidc-cdam: CDAM overlays")
    widget = CdamWidget(viewer)
    viewer.window.add_dock_widget(widget, name="CDAM", area="right")
    widget.add_ct(volume, crops_dir)
    if crops_dir is not None:
        widget.crops_dir.value = str(crops_dir)
        widget.load_nodules()
    if nodule is not None:
        match = [n for n in widget.nodules if n.nodule_id == nodule]
        if not match:
            raise CTError(f"nodule {nodule} is not among this scan's nodules "
                              f"({[n.nodule_id for n in widget.nodules]})")
        widget.nodule.value = match[0]
    if checkpoint is not None:
        files = [checkpoint] if isinstance(checkpoint, str | Path) else list(checkpoint)
        widget.checkpoints.value = files  # loads in a worker: load now, in this thread, instead
        widget.load_checkpoints(files, block=True)
        if not widget.models:
            raise CTError(widget.status.value)
        widget.targets.value = list(targets) if targets is not None else list(widget.models)
    widget.method.value = method
    if view is not None:
        widget.view.value = view
    if points:
        for p in points:
            widget.add_point(list(p)[::-1], compute=False)
    if compute and checkpoint is not None and (points or widget.nodule.value is not None):
        widget.compute(block=not show)
    if models_shown is not None and widget.explained is not None:
        widget.models_shown.value = models_shown
    if run:
        napari.run()
    return viewer, widget
