"""The CDAM dock widget (magicgui): per-target CDAMs of a point or a table nodule, overlaid on any CT.

What a radiologist does:

1. Open a scan: File > Open (a DICOM folder, compressed or not, or NIfTI), or the widget's DICOM folder, its
   series chooser (the largest CT series by default) and "Open series", or File > Open Sample > lidc-cdam.
   A refused series (MR, localizer, gantry tilt, too few slices, uneven spacing) says why.
2. Choose the checkpoint(s): one or several tasks (malignancy, biomarkers), and for each task one model or
   the five folds of ``lidc-cdam train`` (a fold ensemble).
3. Explain **at points** (no nodule table needed): with the "CDAM points" layer in add mode, each click on
   the scan adds a point, explained at once ("Explain on click"); "Explain all points" does every point of
   the layer. Or pick a **table nodule** of a ``lidc-cdam preprocess`` folder (LIDC-IDRI).
4. The 32 mm crop around the point is explained slice by slice (the 2.5D stack) in a worker thread: the
   progress bar moves, "Cancel" stops between batches, results are cached. The maps appear over the CT in
   the scan's coordinates: orange = evidence for the target, blue = counter-evidence, transparent around
   zero, one layer per target ("Show" picks the visible one). "Models" switches between the ensemble mean,
   the folds' sign agreement and each fold.
5. The predictions (ensemble mean +- sd, radiologists' ratings where the table knows them) and the trust flag
   are listed, with the predictions on the slice under the slider. NIfTI export and a PNG of the view are
   one click each; ``lidc-cdam explain-ct`` writes the same as DICOM for a PACS, whose Parametric Maps open
   here again (File > Open).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lidc_cdam.viewer._guard import prepare_torch

prepare_torch()  # before anything imports timm beside the viewer's GL context

import numpy as np  # noqa: E402
from lidc_cdam.viewer._overlays import (  # noqa: E402
    Overlay,
    OverlayLayers,
    agreement_colormap,
    cdam_colormap,
    crop_affine,
    world_to_crop_index,
)
from lidc_cdam.viewer._points import find_points_layer, make_points_layer, point_label, point_lps  # noqa: E402
from lidc_cdam.viewer._reader import META_KEY, ct_layer_data  # noqa: E402
from lidc_cdam.viewer._text import prediction_text  # noqa: E402
from magicgui.widgets import (  # noqa: E402
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    Label,
    ProgressBar,
    PushButton,
    RadioButtons,
    Select,
    SpinBox,
)

from lidc_cdam import ct  # noqa: E402
from lidc_cdam.ct.errors import CTError  # noqa: E402
from lidc_cdam.ct.maps import display_scaled  # noqa: E402
from lidc_cdam.ct.point import to_world  # noqa: E402
from lidc_cdam.ct.read import read_ct  # noqa: E402
from lidc_cdam.ct.volume import CTVolume, window_limits  # noqa: E402

if TYPE_CHECKING:
    import napari

POINT_MODE, TABLE_MODE = "at points", "table nodule"
SLICE_MODES = {"nodule +- 3 slices": "nodule", "all 32 slices": "all"}  # at a point: its centre +- 3
SCALES = {"each slice on its own": "slice", "shared by all slices": "nodule"}
ENSEMBLE, AGREEMENT = "ensemble mean", "sign agreement of the folds"
#: napari dims order that shows each view's plane, the slider stepping along the view axis
DIMS_ORDER = {"axial": (0, 1, 2), "coronal": (1, 0, 2), "sagittal": (2, 0, 1)}
CONTOURS = "nodule contours"
CONTOUR_COLOUR = "#39ff14"  # green: not a colour of the CDAM scale
FIELD_MM = 120.0  # field of view around the nodule after computing
METHOD_LABEL = {v: k for k, v in ct.METHODS.items()}
CONCEPT = "concept: "  # prefix of the concept entries in the target list

__all__ = ["CdamWidget", "Explained", "cdam_colormap", "volume_from_layer"]


@dataclass
class Explained:
    """One crop explained: what was clicked or picked, the crop, one ensemble per task."""

    label: str
    crop: dict[str, Any]
    ensembles: list[ct.EnsembleResult]
    ratings: dict[str, Any] = field(default_factory=dict)  # the nodule table's row (radiologists), if any
    padded_share: float = 0.0

    @property
    def cached(self) -> bool:
        return all(e.cached for e in self.ensembles)


def volume_from_layer(layer: Any) -> CTVolume:
    """The CT volume behind an image layer: the reader's, else built from the layer's data, scale and
    translate (an axial grid)."""
    meta = (layer.metadata or {}).get(META_KEY, {})
    if isinstance(meta.get("volume"), CTVolume):
        return meta["volume"]
    data = np.asarray(layer.data)
    if data.ndim != 3:
        raise CTError(f"layer {layer.name!r} is not a 3D volume (shape {data.shape})")
    return CTVolume(data, tuple(float(s) for s in layer.scale[::-1]), tuple(float(t) for t in layer.translate[::-1]),
                    name=layer.name, meta={"patient_id": meta.get("patient_id", "")})


def _path_or_none(value: Any) -> Path | None:
    if value in (None, "", ".") or str(value) in ("", "."):
        return None
    return Path(value)


class CdamWidget(Container):
    """The dock widget (see the module docstring)."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.viewer = viewer
        self.cache = ct.MapCache(self._cache_folder())
        self.models: dict[str, ct.LoadedModel] = {}  # target -> the first model explaining it
        self.loaded: list[ct.LoadedModel] = []  # every checkpoint (fold ensembles: several per task)
        self.nodules: list[ct.NoduleRef] = []
        self.explained: Explained | None = None
        self.overlay_layers = OverlayLayers(viewer)
        self.worker: Any = None
        self.last_seconds: float | None = None  # click -> overlays shown
        self._t0 = 0.0
        self._current_ct: Any = None
        self._sitk: tuple[Any, Any] | None = None  # (volume, its SimpleITK image): cut crops without re-copying
        self._series: list[ct.SeriesInfo] = []
        self._concepts: dict[tuple[str, str, tuple[str, ...]], list] = {}  # (model, data, names) -> Concept targets

        self.ct_layer = ComboBox(label="CT layer", choices=self._ct_choices)
        self.scan_folder = FileEdit(label="DICOM folder", mode="d")
        self.series = ComboBox(label="Series", choices=lambda _w: self._series_choices(),
                               tooltip="the series of the folder; the largest CT series by default")
        self.open_button = PushButton(text="Open series")
        self.checkpoints = FileEdit(label="Checkpoint(s)", mode="rm", filter="*.pt *.pth *.safetensors",
                                    tooltip="one model per task, or the folds of one task (an ensemble)")
        self.mode = RadioButtons(label="Explain", choices=[POINT_MODE, TABLE_MODE], value=POINT_MODE,
                                 orientation="horizontal")
        self.points_button = PushButton(text="Add points (click on the scan)")
        self.on_click = CheckBox(text="Explain on click", value=True)
        self.point = ComboBox(label="Point", choices=lambda _w: self._point_choices())
        self.all_points_button = PushButton(text="Explain all points")
        self.crops_dir = FileEdit(label="Nodule table", mode="d",
                                  tooltip="output folder of `lidc-cdam preprocess` (nodules.csv + crops/)")
        self.nodule = ComboBox(label="Nodule", choices=lambda _w: [(n.label, n) for n in self.nodules])
        self.cursor_button = PushButton(text="Nodule under cursor")
        self.targets = Select(label="Targets", choices=lambda _w: self._target_choices(),
                              tooltip="the models' outputs, and radiological concepts (concept CDAM, Eq. 4: the "
                                      "mean latent of the training-fold nodules rated so)")
        self.concept_data = FileEdit(label="Concept examples", mode="d",
                                     tooltip="the rated nodules for concepts: a `lidc-cdam preprocess` or `phantoms` "
                                             "folder (nodules.csv + crops/); only the checkpoint's training fold is "
                                             "used (default: the nodule table)")
        self.method = ComboBox(label="Method", choices=list(ct.METHODS), value="CDAM")
        self.samples = SpinBox(label="Samples (Smooth/Integrated)", value=50, min=2, max=500)
        self.view = ComboBox(label="View", choices=list(ct.VIEWS), value="axial")
        self.slices = ComboBox(label="Slices", choices=list(SLICE_MODES), value="nodule +- 3 slices",
                               tooltip="at a point: its centre slice +- 3")
        self.compute_button = PushButton(text="Compute")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="Progress", min=0, max=100, value=0)
        self.shown = ComboBox(label="Show", choices=lambda _w: list(self.overlays))
        self.models_shown = ComboBox(label="Models", choices=lambda _w: self._model_choices(),
                                     tooltip="the folds' mean map, their sign agreement, or one fold")
        self.scale = ComboBox(label="Colour scale", choices=list(SCALES), value="each slice on its own",
                              tooltip="symmetric limits per slice (as in the paper) or one limit for the nodule")
        self.opacity = FloatSlider(label="Opacity", min=0.0, max=1.0, value=0.8)
        self.lung_button = PushButton(text="Lung window (W1500/L-600)")
        self.mediastinum_button = PushButton(text="Mediastinum window (W400/L40)")
        self.predictions = Label(label="Predictions", value="")
        self.export_dir = FileEdit(label="Export to", mode="d")
        self.nifti_button = PushButton(text="Export maps (NIfTI)")
        self.png_button = PushButton(text="Save view (PNG)")
        self.status = Label(label="Status", value="open a CT and choose checkpoint(s), then click on the scan")
        self._point_widgets = [self.points_button, self.on_click, self.point, self.all_points_button]
        self._table_widgets = [self.crops_dir, self.nodule, self.cursor_button]
        self.extend([self.ct_layer, self.scan_folder, self.series, self.open_button, self.checkpoints, self.mode,
                     *self._point_widgets, *self._table_widgets, self.targets, self.concept_data, self.method,
                     self.samples, self.view, self.slices, self.compute_button, self.cancel_button, self.progress,
                     self.shown, self.models_shown, self.scale, self.opacity, self.lung_button, self.mediastinum_button,
                     self.predictions, self.export_dir, self.nifti_button, self.png_button, self.status])
        for w in (self.predictions, self.status):
            with contextlib.suppress(AttributeError):
                w.native.setWordWrap(True)
        with contextlib.suppress(AttributeError):
            self.targets.native.setMaximumHeight(150)
        self._mode_changed()

        self.scan_folder.changed.connect(lambda: self.list_series())
        self.open_button.changed.connect(lambda: self.open_scan(self.scan_folder.value))
        self.ct_layer.changed.connect(self._on_ct_changed)
        self.mode.changed.connect(self._mode_changed)
        self.points_button.changed.connect(lambda: self.points_layer())
        self.point.changed.connect(lambda: self.compute() if self.point.value is not None and self._ready() else None)
        self.all_points_button.changed.connect(lambda: self.compute(all_points=True))
        self.crops_dir.changed.connect(lambda: self.load_nodules())
        self.cursor_button.changed.connect(self.nodule_under_cursor)
        self.checkpoints.changed.connect(lambda: self.load_checkpoints())
        self.compute_button.changed.connect(lambda: self.compute())
        self.cancel_button.changed.connect(self.cancel)
        self.shown.changed.connect(self._show_target)
        self.models_shown.changed.connect(lambda: self._render() if self.explained is not None else None)
        self.opacity.changed.connect(self._set_opacity)
        self.scale.changed.connect(lambda: self._render() if self.explained is not None else None)
        self.lung_button.changed.connect(lambda: self.set_window("lung"))
        self.mediastinum_button.changed.connect(lambda: self.set_window("mediastinum"))
        self.nifti_button.changed.connect(lambda: self.export_nifti())
        self.png_button.changed.connect(lambda: self.save_png())
        viewer.layers.events.inserted.connect(self._layers_changed)
        viewer.layers.events.removed.connect(self._layers_changed)
        viewer.dims.events.current_step.connect(self._update_predictions)
        self._layers_changed()

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _cache_folder() -> Path | None:
        try:
            from lidc_cdam.cache import cache_dir

            return cache_dir() / "viewer" / "maps"
        except OSError:
            return None

    @property
    def overlays(self) -> dict[str, Any]:
        """The overlay layers by target."""
        return self.overlay_layers.layers

    @property
    def results(self) -> list[ct.EnsembleResult]:
        """The ensembles (one per task) of the crop shown."""
        return self.explained.ensembles if self.explained is not None else []

    def _target_choices(self) -> list[str]:
        """The loaded models' outputs, then the concepts of the committed definitions (``concept: <name>``)."""
        if not self.models:
            return []
        from lidc_cdam.data.lidc.concepts import read_concept_definitions

        return [*self.models, *(CONCEPT + name for name in read_concept_definitions().names())]

    def _concept_resolver(self, names: list[str]) -> Any:
        """``concepts(model)`` for :func:`lidc_cdam.ct.explain_tasks_steps`: each model's concept targets from the
        training fold it records (cached per model, data folder and names); :class:`CTError` without data."""
        if not names:
            return None
        root = _path_or_none(self.concept_data.value) or _path_or_none(self.crops_dir.value)
        if root is None:
            raise CTError("concepts need rated example nodules: choose 'Concept examples' (a preprocessed or "
                          "phantom folder with nodules.csv and crops/)")

        def resolve(model: ct.LoadedModel) -> list:
            from lidc_cdam.data.lidc.concepts import concept_targets

            key = (model.fingerprint, str(root), tuple(names))
            if key not in self._concepts:
                self._concepts[key] = concept_targets(model.model, root, names=names)
            return self._concepts[key]

        return resolve

    def _ct_choices(self, _widget=None) -> list[tuple[str, Any]]:
        from napari.layers import Image

        return [(layer.name, layer) for layer in self.viewer.layers
                if isinstance(layer, Image) and layer.ndim == 3 and not layer.rgb
                and (layer.metadata or {}).get(META_KEY, {}).get("kind") not in ("overlay", "parametric-map")]

    def _layers_changed(self, event=None) -> None:
        self.ct_layer.reset_choices()
        choices = [c for c in self.ct_layer.choices if c is not None]
        if self.ct_layer.value is None and choices:
            self.ct_layer.value = choices[0]
        if self.ct_layer.value is not self._current_ct:
            self._on_ct_changed()
        self.overlay_layers.forget_removed()
        self._refresh_points()

    def say(self, text: str, error: bool = False) -> None:
        self.status.value = ("Error: " if error else "") + text
        if error:
            with contextlib.suppress(Exception):
                from napari.utils.notifications import show_warning

                show_warning(text)

    def warn(self, text: str) -> None:
        with contextlib.suppress(Exception):
            from napari.utils.notifications import show_warning

            show_warning(text)

    @property
    def volume(self) -> CTVolume | None:
        layer = self.ct_layer.value
        return None if layer is None else volume_from_layer(layer)

    def _ready(self) -> bool:
        return self.volume is not None and bool(self.loaded) and bool(self.targets.value)

    def _mode_changed(self, *_: Any) -> None:
        at_points = self.mode.value == POINT_MODE
        for w in self._point_widgets:
            w.visible = at_points
        for w in self._table_widgets:
            w.visible = not at_points

    # ------------------------------------------------------------------ scan and series
    def _series_choices(self) -> list[tuple[str, str]]:
        return [(f"{s.modality} {s.description or '(no description)'}: {s.size}"
                 + (" (localizer)" if s.localizer else ""), s.uid) for s in self._series]

    def list_series(self, folder: Any = None) -> list[ct.SeriesInfo]:
        """The series of a DICOM folder into the series chooser, the largest CT series chosen."""
        from lidc_cdam.ct.series import choose_series

        path = _path_or_none(folder if folder is not None else self.scan_folder.value)
        self._series = []
        if path is not None:
            try:
                self._series = ct.list_series(path)
            except CTError as err:
                self.say(str(err), error=True)
        self.series.reset_choices()
        if self._series:
            with contextlib.suppress(CTError):
                self.series.value = choose_series(self._series).uid
            self.say(f"{len(self._series)} series in {path}")
        return self._series

    def open_scan(self, folder: Any, series: str | int | None = None) -> Any:
        """Read a DICOM series folder (the chosen series, by default its largest CT series), a DICOM file or a
        NIfTI file (:func:`lidc_cdam.ct.read_ct`) into a CT layer; a clear message when it is refused."""
        path = _path_or_none(folder)
        if path is None:
            self.say("choose a DICOM series folder first", error=True)
            return None
        if series is None and self._series and self._series[0].folder.is_relative_to(path):
            series = self.series.value
        try:
            volume = read_ct(path, series)
        except CTError as err:
            self.say(str(err), error=True)
            return None
        return self.add_ct(volume)

    def add_ct(self, volume: CTVolume, crops_dir: str | Path | None = None) -> Any:
        data, kwargs, _ = ct_layer_data(volume, **({"crops_dir": str(crops_dir)} if crops_dir else {}))
        layer = self.viewer.add_image(data, **kwargs)
        self.ct_layer.value = layer
        self.say(f"{volume.name}: {volume.shape[0]} slices of {volume.shape[1]} x {volume.shape[2]}, "
                 f"spacing {tuple(round(s, 3) for s in volume.spacing)} mm"
                 + (f" ({volume.meta['warning']})" if volume.meta.get("warning") else ""))
        if volume.meta.get("warning"):
            self.warn(f"{volume.name}: {volume.meta['warning']}")
        return layer

    def _on_ct_changed(self, *_: Any) -> None:
        layer = self.ct_layer.value
        if layer is None or layer is self._current_ct:
            return
        self._current_ct = layer
        crops = (layer.metadata or {}).get(META_KEY, {}).get("crops_dir")
        if crops and _path_or_none(self.crops_dir.value) != Path(crops):
            self.crops_dir.value = crops  # triggers load_nodules
        elif _path_or_none(self.crops_dir.value) is not None:
            self.load_nodules()

    # ------------------------------------------------------------------ points
    def points_layer(self, create: bool = True) -> Any | None:
        """The "CDAM points" layer (made, selected and put in add mode when ``create``)."""
        layer = find_points_layer(self.viewer)
        if layer is None and create:
            layer = make_points_layer(self.viewer)
            layer.events.data.connect(self._points_changed)
        if layer is not None and create:
            self.mode.value = POINT_MODE
            self.viewer.layers.selection.active = layer
            layer.mode = "add"
            self.say("click on the scan to add a point (the 'CDAM points' layer is in add mode)")
        return layer

    def _refresh_points(self) -> None:
        """The point list from the layer; a programmatic change of the choice explains nothing."""
        with self.point.changed.blocked():
            self.point.reset_choices()

    def _point_choices(self) -> list[tuple[str, int]]:
        layer = find_points_layer(self.viewer)
        if layer is None:
            return []
        return [(point_label(k, p), k) for k, p in enumerate(np.asarray(layer.data))]

    def _points_changed(self, event: Any = None) -> None:
        action = str(getattr(event, "action", "added"))
        if action not in ("added", "removed", "changed"):
            return
        self._refresh_points()
        layer = find_points_layer(self.viewer)
        if action == "added" and layer is not None and len(layer.data):
            self.mode.value = POINT_MODE
            with self.point.changed.blocked():
                self.point.value = len(layer.data) - 1
            if self.on_click.value:
                self.compute()

    def add_point(self, world_zyx: Any, compute: bool = True, block: bool = False) -> Any:
        """Add a point (napari world z, y, x mm) as a click would, choose it, and explain it unless not
        ``compute`` (``block``: in this thread; for scripts and tests)."""
        layer = find_points_layer(self.viewer) or self.points_layer()
        with layer.events.data.blocker():
            layer.add(np.asarray(world_zyx, dtype=float)[None])
        self._refresh_points()
        with self.point.changed.blocked():
            self.point.value = len(layer.data) - 1
        return self.compute(block=block) if compute else None

    # ------------------------------------------------------------------ table nodules
    def load_nodules(self) -> list[ct.NoduleRef]:
        """The nodules of the nodule table whose crops lie in the selected CT; their contours as labels."""
        folder = _path_or_none(self.crops_dir.value)
        volume = self.volume
        if folder is None or volume is None:
            return []
        try:
            self.nodules = ct.list_nodules(folder, volume)
        except CTError as err:
            self.say(str(err), error=True)
            self.nodules = []
        self.nodule.reset_choices()
        if not self.nodules:
            self.say(f"no nodule of {folder} lies in {volume.name} (crops from another scan?)", error=True)
            return []
        self.mode.value = TABLE_MODE
        labels = volume.meta.get("labels")
        if labels is None:
            labels = ct.nodule_labels(self.nodules, volume)
        if CONTOURS in self.viewer.layers:
            self.viewer.layers[CONTOURS].data = labels
        else:
            layer = self.viewer.add_labels(labels, name=CONTOURS, opacity=0.9,
                                           metadata={META_KEY: {"kind": "contours"}}, **volume.layer_kwargs())
            layer.contour = 1
            with contextlib.suppress(Exception):  # napari >= 0.5
                from napari.utils.colormaps import DirectLabelColormap

                colours = {None: "transparent", 0: "transparent"}
                colours.update({k: CONTOUR_COLOUR for k in range(1, int(labels.max()) + 1)})
                layer.colormap = DirectLabelColormap(color_dict=colours)
        self.say(f"{len(self.nodules)} nodule(s) in this scan")
        return self.nodules

    def nodule_under_cursor(self, *_: Any) -> ct.NoduleRef | None:
        """Select the nodule whose crop centre is nearest to the mouse cursor (within 16 mm)."""
        pos = np.asarray(self.viewer.cursor.position, dtype=float)[-3:]
        found = ct.nodule_at(self.nodules, pos[::-1])
        if found is None:
            self.say("no nodule of the table within 16 mm of the cursor", error=True)
            return None
        self.mode.value = TABLE_MODE
        self.nodule.value = found
        self.say(f"nodule {found.nodule_id}")
        return found

    # ------------------------------------------------------------------ models
    def load_checkpoints(self, paths: Any = None, block: bool = False) -> Any:
        """Load and check the checkpoints (in a worker thread unless ``block``); fill the targets."""
        value = self.checkpoints.value if paths is None else paths
        if isinstance(value, str | Path):
            value = [value]
        files = [Path(p) for p in (value or ()) if _path_or_none(p) is not None]

        def load() -> tuple[list[ct.LoadedModel], list[str]]:
            loaded, errors = [], []
            for f in files:
                try:
                    loaded.append(ct.load_checked_model(f))
                except CTError as err:
                    errors.append(str(err))
            return loaded, errors

        if block:
            self._models_loaded(load())
            return None
        from napari.qt.threading import create_worker

        self.say("loading checkpoint(s)...")
        worker = create_worker(load, _start_thread=False)
        worker.returned.connect(self._models_loaded)
        worker.errored.connect(lambda err: self.say(f"{type(err).__name__}: {err}", error=True))
        worker.start()
        self._loader = worker
        return worker

    def _models_loaded(self, out: tuple[list[ct.LoadedModel], list[str]]) -> None:
        loaded, errors = out
        self.loaded = list(loaded)
        self.models = {}
        for m in loaded:
            for t in m.targets:
                self.models.setdefault(t, m)
        choices = list(self.models)
        self.targets.reset_choices()
        self.targets.value = choices[:1]
        if loaded and loaded[0].view in ct.VIEWS:
            self.view.value = loaded[0].view
        try:
            groups = ct.group_checkpoints(loaded) if loaded else {}
        except CTError:
            groups = {}
        if errors:
            self.say(" | ".join(errors), error=True)
        elif loaded:
            tasks = ", ".join(f"{g[0].task} ({len(g)} fold{'s' if len(g) > 1 else ''})" for g in groups.values())
            self.say(f"model(s) loaded: {tasks}")

    # ------------------------------------------------------------------ computing
    def _sitk_image(self, volume: CTVolume) -> Any:
        if self._sitk is None or self._sitk[0] is not volume:
            from lidc_cdam.data.lidc.crops import ct_image

            self._sitk = (volume, ct_image(volume.hu, volume.geometry()))
        return self._sitk[1]

    def _chosen_points(self, all_points: bool) -> list[tuple[str, np.ndarray]]:
        layer = find_points_layer(self.viewer)
        data = np.asarray(layer.data) if layer is not None else np.empty((0, 3))
        if not len(data):
            raise CTError("no point to explain: press 'Add points' and click on the scan")
        if all_points:
            return [(point_label(k, p), p) for k, p in enumerate(data)]
        k = self.point.value if self.point.value is not None else len(data) - 1
        if not 0 <= k < len(data):
            raise CTError("choose a point")
        return [(point_label(k, data[k]), data[k])]

    def compute(self, block: bool = False, all_points: bool = False) -> Any:
        """Explain the chosen point (or every point, or the chosen table nodule) in a worker thread
        (``block``: in this thread, for scripts); the last one explained is shown."""
        self._t0 = time.perf_counter()
        volume = self.volume
        try:
            if volume is None:
                raise CTError("open a CT first")
            if not self.loaded:
                raise CTError("choose at least one target (load a checkpoint first)")
            chosen = list(self.targets.value or [])
            if not chosen:
                raise CTError("choose at least one target (load a checkpoint first)")
            targets = [t for t in chosen if not t.startswith(CONCEPT)]
            concepts = self._concept_resolver([t[len(CONCEPT):] for t in chosen if t.startswith(CONCEPT)])
            if self.mode.value == TABLE_MODE:
                nodule = self.nodule.value
                if nodule is None:
                    raise CTError("choose a nodule (nodule table, then the list or 'Nodule under cursor')")
                jobs: list[tuple[str, Any]] = [(nodule.nodule_id, nodule)]
            else:
                jobs = self._chosen_points(all_points)
                for _, p in jobs:  # every point checked before any work
                    to_world(volume, point_lps(p))
        except CTError as err:
            self.say(str(err), error=True)
            return None
        method = ct.METHODS[self.method.value]
        settings = {"method": method, "view": self.view.value, "slices": SLICE_MODES[self.slices.value],
                    "margin": 3, "options": {"n": int(self.samples.value)} if method != "cdam" and
                    method != "attention" else None, "cache": self.cache}
        concept_task = "malignancy" if any(m.task == "malignancy" for m in self.loaded) else self.loaded[0].task
        models = [m for m in self.loaded if set(m.targets) & set(targets) or (concepts and m.task == concept_task)]

        def work():
            shown = None
            for j, (label, what) in enumerate(jobs):
                if isinstance(what, ct.NoduleRef):
                    crop, ratings, padded = ct.read_crop(what.crop_path), dict(what.row), 0.0
                else:
                    pc = ct.crop_at_point(volume, point_lps(what), image=self._sitk_image(volume), point_id=label)
                    crop, ratings, padded = pc.crop, {}, pc.padded_share
                steps = ct.explain_tasks_steps(models, crop, targets, where=label, concepts=concepts,
                                               concept_task=concept_task, **settings)
                while True:
                    try:
                        done, total = next(steps)
                    except StopIteration as stop:
                        shown = Explained(label, crop, stop.value, ratings, padded)
                        break
                    yield (j + done / max(total, 1)) / len(jobs)
            return shown

        if self.worker is not None:
            with contextlib.suppress(RuntimeError):
                self.worker.quit()
        self.progress.value = 0
        self.compute_button.enabled = False
        if block:
            gen = work()
            try:
                while True:
                    self.progress.value = int(100 * next(gen))
            except StopIteration as stop:
                self._show(stop.value)
            except Exception as err:
                self._failed(err)
            return None
        from napari.qt.threading import create_worker

        self.say(f"explaining {jobs[0][0] if len(jobs) == 1 else f'{len(jobs)} points'}...")
        worker = create_worker(work, _start_thread=False)
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
        self.explained = explained
        self.models_shown.reset_choices()
        if self.models_shown.value is None:
            self.models_shown.value = ENSEMBLE
        self._render()
        self.progress.value = 100
        self.compute_button.enabled = True
        view = explained.ensembles[0].view if explained.ensembles else self.view.value
        self._focus(explained.crop, view)
        self._update_predictions()
        self.last_seconds = time.perf_counter() - self._t0
        n_slices = len(explained.ensembles[0].slices or []) if explained.ensembles else 0
        what = "a 3D volume" if explained.ensembles and explained.ensembles[0].view == "3d" else f"{n_slices} slices"
        folds = max((e.n for e in explained.ensembles), default=1)
        self.say(f"{explained.label}: {what}, {len(self.overlays)} map(s)"
                 + (f", ensembles of {folds} folds" if folds > 1 else "") + f" in {self.last_seconds:.2f} s"
                 + (" (cached)" if explained.cached else "") + "; orange = evidence, blue = counter-evidence")

    def _model_choices(self) -> list[str]:
        folds = max((e.n for e in self.results), default=1)
        if folds <= 1:
            return [ENSEMBLE]
        return [ENSEMBLE, AGREEMENT, *(f"fold {i + 1}" for i in range(folds))]

    def _render(self, *_: Any) -> None:
        """The overlays of the shown crop, one per target, from the choice of models and colour scale."""
        explained = self.explained
        if explained is None:
            return
        which = self.models_shown.value or ENSEMBLE
        scale = SCALES[self.scale.value]
        affine = crop_affine(explained.crop)
        overlays = []
        for ens in explained.ensembles:
            for k, target in enumerate(ens.targets):
                fold = int(which.split()[1]) - 1 if which.startswith("fold ") else None
                base = {"kind": "overlay", "target": target, "label": explained.label, "method": ens.method,
                        "view": ens.view, "models": which, "crop_slices": ens.slices}
                name = f"{METHOD_LABEL[ens.method]} {target} ({ens.view})"
                if which == AGREEMENT:
                    data, limits, cmap = ens.agreement[k], (0.0, 1.0), agreement_colormap()
                    name += f" agreement of {ens.n} folds"
                else:
                    raw = ens.model_maps[fold, k] if fold is not None and fold < ens.n else ens.mean_maps[k]
                    data, limit = display_scaled(raw, ens.view, scale)
                    limits = (-limit, limit) if ens.signed else (0.0, limit)
                    cmap = cdam_colormap(ens.signed)
                    if ens.n > 1:
                        name += f" fold {fold + 1}" if fold is not None and fold < ens.n else f" mean of {ens.n}"
                overlays.append(Overlay(target, name, np.asarray(data, dtype=np.float32), affine, limits, cmap,
                                        {META_KEY: {**base, "limit": limits[1]}}))
        self.overlay_layers.show(overlays, float(self.opacity.value), visible=self.shown.value)
        if CONTOURS in self.viewer.layers:  # the consensus outline stays visible on top of the maps
            index = self.viewer.layers.index(self.viewer.layers[CONTOURS])
            if index != len(self.viewer.layers) - 1:
                self.viewer.layers.move(index, len(self.viewer.layers))
        chosen = self.shown.value
        self.shown.reset_choices()
        if self.overlays:
            self.shown.value = chosen if chosen in self.overlays else next(iter(self.overlays))
            self._show_target()

    def _slice_under_slider(self) -> int | None:
        """The crop slice (along the shown view) at the viewer's current position, None outside the crop."""
        explained = self.explained
        if explained is None or not explained.ensembles or len(self.viewer.dims.point) < 3:
            return None
        view = explained.ensembles[0].view
        index = world_to_crop_index(explained.crop, self.viewer.dims.point)
        s = round(float(index[ct.VIEWS.get(view, 0)]))  # a 3D model's maps: along z
        return s if 0 <= s < ct.CROP else None

    def _update_predictions(self, *_: Any) -> None:
        explained = self.explained
        if explained is None:
            return
        text, warnings = prediction_text(explained.ensembles, explained.ratings, self._slice_under_slider(),
                                         explained.padded_share)
        self.predictions.value = text
        shown_before = getattr(self, "_warned", None)
        if warnings and shown_before != (explained.label, tuple(warnings)):
            self._warned = (explained.label, tuple(warnings))
            for w in warnings:
                self.warn(w)

    def _focus(self, crop: dict[str, Any], view: str) -> None:
        """Slider on the crop's central slice along the view (the one predicted), camera on the crop's centre,
        the view's plane displayed."""
        view = view if view in ct.VIEWS else "axial"  # a 3D model's map is a volume: shown axially
        index = np.full(3, (ct.CROP - 1) / 2.0)
        index[ct.VIEWS[view]] = ct.CENTRE
        centre = (crop_affine(crop) @ np.append(index, 1.0))[:3]  # world z, y, x
        ndim = self.viewer.dims.ndim
        if ndim >= 3:
            self.viewer.dims.order = tuple(range(ndim - 3)) + tuple(ndim - 3 + a for a in DIMS_ORDER[view])
            self.viewer.dims.set_point(range(ndim - 3, ndim), centre.tolist())
            displayed = list(self.viewer.dims.displayed)
            self.viewer.reset_view()
            world = np.asarray(self.viewer.layers.extent.world)  # [2, ndim]
            extent = float((world[1] - world[0])[displayed].max())
            camera = self.viewer.scene.camera if hasattr(self.viewer, "scene") else self.viewer.camera  # napari 0.9
            camera.center = tuple(centre[[d - (ndim - 3) for d in displayed]])
            camera.zoom = camera.zoom * max(extent / FIELD_MM, 1.0)

    def _show_target(self, *_: Any) -> None:
        chosen = self.shown.value
        for target, layer in self.overlays.items():  # each setter redraws: set only what changes
            if layer.visible != (target == chosen):
                layer.visible = target == chosen
            with contextlib.suppress(AttributeError):
                if layer.colorbar.visible != (target == chosen):
                    layer.colorbar.visible = target == chosen
        if chosen in self.overlays and self.viewer.layers.selection.active is not self.overlays[chosen]:
            self.viewer.layers.selection.active = self.overlays[chosen]

    def _set_opacity(self, *_: Any) -> None:
        for layer in self.overlays.values():
            layer.opacity = float(self.opacity.value)

    def set_window(self, name: str) -> None:
        layer = self.ct_layer.value
        if layer is not None:
            layer.contrast_limits = window_limits(name)

    # ------------------------------------------------------------------ export
    def _export_folder(self, folder: Any = None) -> Path | None:
        path = _path_or_none(folder if folder is not None else self.export_dir.value)
        if path is None:
            self.say("choose a folder to export to", error=True)
        return path

    def export_nifti(self, folder: Any = None) -> list[Path]:
        """Every computed map (raw scores of the ensemble mean; the sign agreement too for an ensemble) as
        ``<label>_<method>_<view>_<target>.nii.gz`` on the scan's grid."""
        out = self._export_folder(folder)
        volume = self.volume
        explained = self.explained
        if out is None or volume is None or explained is None:
            if out is not None:
                self.say("nothing to export: compute maps first", error=True)
            return []
        stem = explained.label.split(" (")[0]
        written = []
        for ens in explained.ensembles:
            for k, target in enumerate(ens.targets):
                name = f"{stem}_{ens.method}_{ens.view}_{target}"
                raw = ct.place_on_scan(ens.mean_maps[k], explained.crop, volume)  # whatever the colour scale
                written.append(ct.export_nifti(raw, volume, out / f"{name}.nii.gz"))
                if ens.n > 1:
                    agree = ct.place_on_scan(ens.agreement[k], explained.crop, volume)
                    written.append(ct.export_nifti(agree, volume, out / f"{name}_agreement.nii.gz"))
        self.say(f"wrote {len(written)} NIfTI map(s) to {out}")
        return written

    def save_png(self, path: Any = None) -> Path | None:
        """The current view (canvas) as a PNG."""
        target = _path_or_none(path)
        if target is None:
            folder = self._export_folder()
            if folder is None:
                return None
            stem = self.explained.label.split(" (")[0] if self.explained is not None else "view"
            target = folder / f"{stem}_view.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        self.viewer.screenshot(str(target), canvas_only=True)
        self.say(f"saved {target}")
        return target
