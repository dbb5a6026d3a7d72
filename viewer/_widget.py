"""The CDAM dock widget (magicgui): per-target CDAMs of a point or a table nodule, overlaid on any CT.

What a radiologist does:

1. Open a scan: File > Open (a DICOM folder, compressed or not, NIfTI, NRRD or MHA / MHD), the widget's DICOM
   folder, its series chooser (the largest CT series by default) and "Open series", its "CT file", or
   File > Open Sample > lidc-cdam. A refused series (MR, localizer, gantry tilt, too few slices, uneven spacing)
   says why; the scan's warnings stay in the status line.
2. Choose the checkpoint(s): one or several tasks (malignancy, biomarkers), and for each task one model or the
   five folds of ``lidc-cdam train`` (a fold ensemble).
3. Explain **at points** (no nodule table needed): with the "CDAM points" layer in add mode, each click on the
   scan adds a point, explained at once ("Explain on click"); "Explain all points" does every point of the layer.
   Or pick a **table nodule** of a ``lidc-cdam preprocess`` folder (LIDC-IDRI).
4. The 32 mm crop around the point (patient axes) is explained slice by slice (the 2.5D stack) in a worker
   thread: the progress bar moves, "Cancel" stops between batches, results are cached. The maps appear over the
   CT: orange = evidence for the target, blue = counter-evidence, one layer per target ("Show" picks the visible
   one). "Models" switches between the ensemble mean, the folds' sign agreement and each fold.
5. The predictions and the trust flag are listed; the crop's, the trust and the padding warnings go to the status
   line. "Export point" writes the point's files as ``lidc-cdam explain-ct`` does (NIfTI maps on the scan's grid,
   ``predictions.json``, the report); a PNG of the view is one click.

This module composes the panels (:mod:`._scan_panel`, :mod:`._where_panel`, :mod:`._display_panel`) over the Qt-free
:class:`~lidc_cdam.viewer._controller.CdamController`, and owns computing (worker, progress, cancel), export and
the status line.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lidc_cdam.viewer._guard import prepare_torch

prepare_torch()  # before anything imports timm beside the viewer's GL context

from lidc_cdam.viewer._controller import (  # noqa: E402
    CdamController,
    Explained,
    describe,
    path_or_none,
    volume_from_layer,
)
from lidc_cdam.viewer._display_panel import DisplayPanel  # noqa: E402
from lidc_cdam.viewer._overlays import META_KEY, cdam_colormap  # noqa: E402
from lidc_cdam.viewer._pacs_panel import PacsPanel  # noqa: E402
from lidc_cdam.viewer._scan_panel import ModelPanel, ScanPanel  # noqa: E402
from lidc_cdam.viewer._where_panel import WherePanel  # noqa: E402
from magicgui.widgets import Container, FileEdit, Label, ProgressBar, PushButton, Widget  # noqa: E402

from lidc_cdam.ct.errors import CTError  # noqa: E402
from lidc_cdam.ct.volume import CTVolume  # noqa: E402

if TYPE_CHECKING:
    import napari

__all__ = ["CdamWidget", "Explained", "cdam_colormap", "volume_from_layer"]


class CdamWidget(Container):
    """The dock widget (see the module docstring). Its panels' magicgui widgets are its attributes too
    (``widget.targets``, ``widget.point``, ...)."""

    def __init__(self, viewer: napari.viewer.Viewer, controller: CdamController | None = None):
        super().__init__(labels=True)
        self.viewer = viewer
        self.controller = controller or CdamController()
        self.worker: Any = None
        self.last_seconds: float | None = None  # click -> overlays shown
        self._t0 = 0.0
        self._current_ct: Any = None
        self._volume_warnings: list[str] = []
        self._notified: set[str] = set()
        self.scan = ScanPanel(self)
        self.model_panel = ModelPanel(self)
        self.where = WherePanel(self)
        self.display = DisplayPanel(self)
        self.pacs = PacsPanel(self)
        for panel in (self.scan, self.model_panel, self.where, self.display, self.pacs):
            for name, w in vars(panel).items():
                if isinstance(w, Widget):
                    setattr(self, name, w)  # widget.targets, widget.point, ...: the panels' widgets
        self.compute_button = PushButton(text="Compute")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="Progress", min=0, max=100, value=0)
        self.export_dir = FileEdit(label="Export to", mode="d")
        self.nifti_button = PushButton(text="Export point (NIfTI maps, JSON, report)",
                                       tooltip="the point's files as `lidc-cdam explain-ct` writes them, in "
                                               "<folder>/<point>/")
        self.png_button = PushButton(text="Save view (PNG)")
        self.status = Label(label="Status", value="open a CT and choose checkpoint(s), then click on the scan")
        with contextlib.suppress(AttributeError):
            self.status.native.setWordWrap(True)
        models = self.model_panel.widgets
        self.extend([*self.scan.widgets, models[0], *self.where.widgets, *models[1:], self.compute_button,
                     self.cancel_button, self.progress, *self.display.widgets, self.export_dir, self.nifti_button,
                     self.png_button, *self.pacs.widgets, self.status])
        self.ct_layer.changed.connect(self._on_ct_changed)
        self.compute_button.changed.connect(lambda: self.compute())
        self.cancel_button.changed.connect(self.cancel)
        self.nifti_button.changed.connect(lambda: self.export_nifti())
        self.png_button.changed.connect(lambda: self.save_png())
        viewer.layers.events.inserted.connect(self._layers_changed)
        viewer.layers.events.removed.connect(self._layers_changed)
        self._layers_changed()

    # ------------------------------------------------------------------ state (the controller's)
    @property
    def volume(self) -> CTVolume | None:
        return self.controller.volume

    @property
    def cache(self) -> Any:
        return self.controller.cache

    @cache.setter
    def cache(self, value: Any) -> None:
        self.controller.cache = value

    @property
    def models(self) -> dict[str, Any]:
        return self.controller.models

    @property
    def loaded(self) -> list[Any]:
        return self.controller.loaded

    @property
    def nodules(self) -> list[Any]:
        return self.controller.nodules

    @property
    def explained(self) -> Explained | None:
        return self.controller.explained

    @property
    def results(self) -> list[Any]:
        """The ensembles (one per task) of the crop shown."""
        return self.explained.ensembles if self.explained is not None else []

    @property
    def overlays(self) -> dict[str, Any]:
        """The overlay layers by target."""
        return self.display.overlays

    def ready(self) -> bool:
        return self.volume is not None and bool(self.loaded) and bool(self.targets.value)

    # ------------------------------------------------------------------ the panels' actions
    def open_scan(self, path: Any, series: str | int | None = None) -> Any:
        return self.scan.open_scan(path, series)

    def list_series(self, folder: Any = None) -> list[Any]:
        return self.scan.list_series(folder)

    def add_ct(self, volume: CTVolume, crops_dir: str | Path | None = None) -> Any:
        return self.scan.add_ct(volume, crops_dir)

    def load_checkpoints(self, paths: Any = None, block: bool = False) -> Any:
        return self.model_panel.load_checkpoints(paths, block)

    def points_layer(self, create: bool = True) -> Any:
        return self.where.points_layer(create)

    def add_point(self, world_zyx: Any, compute: bool = True, block: bool = False) -> Any:
        return self.where.add_point(world_zyx, compute, block)

    def load_nodules(self) -> list[Any]:
        return self.where.load_nodules()

    def nodule_under_cursor(self, *_: Any) -> Any:
        return self.where.nodule_under_cursor()

    def set_window(self, name: str) -> None:
        self.display.set_window(name)

    def focus(self, crop: dict[str, Any], view: str) -> None:
        self.display.focus(crop, view)

    # ------------------------------------------------------------------ status
    def say(self, text: str, error: bool = False, warnings: list[str] | tuple[str, ...] = ()) -> None:
        """The status line: ``text``, then every warning about what is shown (the scan's, the crop's, trust and
        padding), each also a napari notification once; an error is a notification too."""
        shown = list(dict.fromkeys([*warnings, *self._volume_warnings]))
        self.status.value = ("Error: " if error else "") + text + "".join(f"\nWarning: {w}" for w in shown)
        if error:
            self.warn(text)
        for w in shown:
            if w not in self._notified:
                self._notified.add(w)
                self.warn(w)

    def warn(self, text: str) -> None:
        with contextlib.suppress(Exception):
            from napari.utils.notifications import show_warning

            show_warning(text)

    # ------------------------------------------------------------------ the CT layer
    def _layers_changed(self, event: Any = None) -> None:
        self.ct_layer.reset_choices()
        choices = [c for c in self.ct_layer.choices if c is not None]
        if self.ct_layer.value is None and choices:
            self.ct_layer.value = choices[0]
        if self.ct_layer.value is not self._current_ct:
            self._on_ct_changed()
        self.display.overlay_layers.forget_removed()
        self.where.refresh_points()

    def _on_ct_changed(self, *_: Any) -> None:
        layer = self.ct_layer.value
        if layer is self._current_ct:
            return
        self._current_ct = layer
        try:
            volume = volume_from_layer(layer) if layer is not None else None
        except CTError as err:
            volume = None
            self.say(str(err), error=True)
        self._volume_warnings = self.controller.set_volume(volume)
        self._notified = set()
        if volume is None:
            return
        self.say(describe(volume))
        crops = (layer.metadata or {}).get(META_KEY, {}).get("crops_dir")
        if crops and path_or_none(self.crops_dir.value) != Path(crops):
            self.crops_dir.value = crops  # triggers load_nodules
        elif path_or_none(self.crops_dir.value) is not None:
            self.load_nodules()

    # ------------------------------------------------------------------ computing
    def compute(self, block: bool = False, all_points: bool = False) -> Any:
        """Explain the chosen point (or every point, or the chosen table nodule) in a worker thread (``block``:
        in this thread, for scripts); the last one explained is shown."""
        self._t0 = time.perf_counter()
        chosen = list(self.targets.value or [])
        concept_data = path_or_none(self.concept_data.value) or path_or_none(self.crops_dir.value)
        try:
            self.controller.check(chosen)
            jobs = self.where.jobs(all_points)
            work = self.controller.plan(chosen, jobs, **self.model_panel.settings(), concept_data=concept_data)
        except CTError as err:
            self.say(str(err), error=True)
            return None
        if self.worker is not None:
            with contextlib.suppress(RuntimeError):
                self.worker.quit()
        self.progress.value = 0
        self.compute_button.enabled = False
        if block:
            try:
                while True:
                    self.progress.value = int(100 * next(work))
            except StopIteration as stop:
                self._show(stop.value)
            except Exception as err:
                self._failed(err)
            return None
        from napari.qt.threading import create_worker

        def run():
            return (yield from work)

        self.say(f"explaining {jobs[0][0] if len(jobs) == 1 else f'{len(jobs)} points'}...")
        worker = create_worker(run, _start_thread=False)
        worker.yielded.connect(lambda f: setattr(self.progress, "value", int(100 * f)))
        worker.returned.connect(self._show)
        worker.errored.connect(self._failed)
        worker.aborted.connect(lambda: self.say("cancelled: nothing shown changed"))
        worker.finished.connect(self._finished)
        self.worker = worker
        self.cancel_button.enabled = True
        worker.start()
        return worker

    def cancel(self, *_: Any) -> None:
        """Stop the running computation after its current batch of slices (the shown maps stay)."""
        if self.worker is not None:
            with contextlib.suppress(RuntimeError):
                self.worker.quit()
            self.say("cancelling...")

    def _finished(self) -> None:
        self.compute_button.enabled = True
        self.cancel_button.enabled = False
        self.worker = None

    def _failed(self, err: BaseException) -> None:
        self.compute_button.enabled = True
        self.cancel_button.enabled = False
        self.progress.value = 0
        msg = str(err) if isinstance(err, CTError) else f"{type(err).__name__}: {err}"
        self.say(msg, error=True)

    def _show(self, explained: Explained | None) -> None:
        if explained is None:
            return
        self.controller.explained = explained
        self.display.show_explained()
        self.progress.value = 100
        self.compute_button.enabled = True
        self.last_seconds = time.perf_counter() - self._t0
        ensembles = explained.ensembles
        n_slices = len(ensembles[0].slices or []) if ensembles else 0
        what = "a 3D volume" if ensembles and ensembles[0].view == "3d" else f"{n_slices} slices"
        folds = max((e.n for e in ensembles), default=1)
        self.say(f"{explained.label}: {what}, {len(self.overlays)} map(s)"
                 + (f", ensembles of {folds} folds" if folds > 1 else "") + f" in {self.last_seconds:.2f} s"
                 + (" (cached)" if explained.cached else "") + "; orange = evidence, blue = counter-evidence",
                 warnings=explained.warnings)

    # ------------------------------------------------------------------ export
    def _export_folder(self, folder: Any = None) -> Path | None:
        path = path_or_none(folder if folder is not None else self.export_dir.value)
        if path is None:
            self.say("choose a folder to export to", error=True)
        return path

    def export_nifti(self, folder: Any = None) -> list[Path]:
        """The shown point's files as ``explain-ct`` writes them (:meth:`CdamController.export`): each target's map
        (raw scores of the ensemble mean; the sign agreement too for an ensemble) as NIfTI on the scan's grid,
        ``crop.npz``, ``maps.npz``, ``predictions.json`` and the report, in ``<folder>/<point>/``."""
        out = self._export_folder(folder)
        if out is None:
            return []
        try:
            written = self.controller.export(out)
        except CTError as err:
            self.say(str(err), error=True)
            return []
        self.say(f"wrote {len(written)} file(s) to {written[0].parent if written else out}",
                 warnings=self.explained.warnings)
        return written

    export_point = export_nifti

    def save_png(self, path: Any = None) -> Path | None:
        """The current view (canvas) as a PNG."""
        target = path_or_none(path)
        if target is None:
            folder = self._export_folder()
            if folder is None:
                return None
            stem = self.explained.stem if self.explained is not None else "view"
            target = folder / f"{stem}_view.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        self.viewer.screenshot(str(target), canvas_only=True)
        self.say(f"saved {target}")
        return target
