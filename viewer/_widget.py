"""The CDAM dock widget (magicgui): per-target overlays of one nodule's 2.5D maps on the CT.

What a radiologist does: open a scan (File > Open a DICOM folder, the widget's "Open DICOM folder", or
File > Open Sample > lidc-cdam > Synthetic chest), choose the preprocessed folder (``nodules.csv`` +
``crops/``) and a model checkpoint (malignancy and/or biomarkers), pick a nodule from the list (or put the
cursor on it and press "Nodule under cursor"), targets, method and view, then "Compute". The maps are
computed in a worker thread (the progress bar moves, the UI stays responsive; results are cached) and
appear over the CT in the scan's own coordinates: orange = evidence for the target, blue = counter-evidence,
transparent around zero, symmetric limits (colour bar), one layer per target ("Show" picks the visible one),
the slice slider stepping through per-slice maps. The predictions are listed beside the radiologists'
ratings; window presets, NIfTI export and a PNG of the view are one click each.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lidc_cdam.viewer._guard import prepare_torch

prepare_torch()  # before anything imports timm beside the viewer's GL context

import numpy as np  # noqa: E402
from lidc_cdam.viewer._reader import META_KEY, ct_layer_data  # noqa: E402
from magicgui.widgets import (  # noqa: E402
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    Label,
    ProgressBar,
    PushButton,
    Select,
    SpinBox,
)

from lidc_cdam import ct  # noqa: E402
from lidc_cdam.ct.errors import CTError  # noqa: E402
from lidc_cdam.ct.read import read_ct  # noqa: E402
from lidc_cdam.ct.volume import CTVolume, window_limits  # noqa: E402

if TYPE_CHECKING:
    import napari

SLICE_MODES = {"nodule +- 3 slices": "nodule", "all 32 slices": "all"}
SCALES = {"each slice on its own": "slice", "shared by all slices": "nodule"}
#: napari dims order that shows each view's plane, the slider stepping along the view axis
DIMS_ORDER = {"axial": (0, 1, 2), "coronal": (1, 0, 2), "sagittal": (2, 0, 1)}
CONTOURS = "nodule contours"
CONTOUR_COLOUR = "#39ff14"  # green: not a colour of the CDAM scale
FIELD_MM = 120.0  # field of view around the nodule after computing


def cdam_colormap(signed: bool = True, n: int = 256):
    """napari colormap from :func:`lidc_cdam.viz.cdam_cmap`: blue - transparent - orange (signed, for
    limits ``[-L, L]``) or transparent - orange (unsigned, ``[0, L]``)."""
    from napari.utils.colormaps import Colormap

    from lidc_cdam.viz import cdam_cmap

    t = np.linspace(0.0, 1.0, n)
    if signed:
        rgba = cdam_cmap()(t)
        strength = np.abs(2.0 * t - 1.0)
    else:
        rgba = cdam_cmap()(0.5 + 0.5 * t)
        strength = t
    rgba[:, 3] = np.clip((strength - 0.06) / 0.3, 0.0, 1.0)
    name = "cdam-signed" if signed else "cdam-positive"
    return Colormap(rgba, name=name, display_name=name)


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
        self.models: dict[str, ct.LoadedModel] = {}
        self.nodules: list[ct.NoduleRef] = []
        self.result: ct.MapResult | None = None
        self.results: list[ct.MapResult] = []
        self._crop_path: Path | None = None
        self.overlays: dict[str, Any] = {}
        self.worker: Any = None
        self.last_seconds: float | None = None  # click -> overlay shown
        self._t0 = 0.0
        self._current_ct: Any = None

        self.ct_layer = ComboBox(label="CT layer", choices=self._ct_choices)
        self.scan_folder = FileEdit(label="DICOM folder", mode="d")
        self.open_button = PushButton(text="Open DICOM folder")
        self.crops_dir = FileEdit(label="Nodule table", mode="d",
                                  tooltip="output folder of `lidc-cdam preprocess` (nodules.csv + crops/)")
        self.nodule = ComboBox(label="Nodule", choices=lambda _w: [(n.label, n) for n in self.nodules])
        self.cursor_button = PushButton(text="Nodule under cursor")
        self.checkpoints = FileEdit(label="Checkpoint(s)", mode="rm", filter="*.pt *.pth *.safetensors")
        self.targets = Select(label="Targets", choices=lambda _w: list(self.models))
        self.method = ComboBox(label="Method", choices=list(ct.METHODS), value="CDAM")
        self.samples = SpinBox(label="Samples (Smooth/Integrated)", value=50, min=2, max=500)
        self.view = ComboBox(label="View", choices=list(ct.VIEWS), value="axial")
        self.slices = ComboBox(label="Slices", choices=list(SLICE_MODES), value="nodule +- 3 slices")
        self.compute_button = PushButton(text="Compute")
        self.progress = ProgressBar(label="Progress", min=0, max=100, value=0)
        self.shown = ComboBox(label="Show", choices=lambda _w: list(self.overlays))
        self.scale = ComboBox(label="Colour scale", choices=list(SCALES), value="each slice on its own",
                              tooltip="symmetric limits per slice (as in the paper) or one limit for the nodule")
        self.opacity = FloatSlider(label="Opacity", min=0.0, max=1.0, value=0.8)
        self.lung_button = PushButton(text="Lung window (W1500/L-600)")
        self.mediastinum_button = PushButton(text="Mediastinum window (W400/L40)")
        self.predictions = Label(label="Predictions", value="")
        self.export_dir = FileEdit(label="Export to", mode="d")
        self.nifti_button = PushButton(text="Export maps (NIfTI)")
        self.png_button = PushButton(text="Save view (PNG)")
        self.status = Label(label="Status", value="open a CT, choose the nodule table and a checkpoint")
        self.extend([self.ct_layer, self.scan_folder, self.open_button, self.crops_dir, self.nodule,
                     self.cursor_button, self.checkpoints, self.targets, self.method, self.samples, self.view,
                     self.slices, self.compute_button, self.progress, self.shown, self.scale, self.opacity,
                     self.lung_button, self.mediastinum_button, self.predictions, self.export_dir,
                     self.nifti_button, self.png_button, self.status])
        for w in (self.predictions, self.status):
            with contextlib.suppress(AttributeError):
                w.native.setWordWrap(True)
        with contextlib.suppress(AttributeError):
            self.targets.native.setMaximumHeight(150)

        self.open_button.changed.connect(lambda: self.open_scan(self.scan_folder.value))
        self.ct_layer.changed.connect(self._on_ct_changed)
        self.crops_dir.changed.connect(lambda: self.load_nodules())
        self.cursor_button.changed.connect(self.nodule_under_cursor)
        self.checkpoints.changed.connect(lambda: self.load_checkpoints())
        self.compute_button.changed.connect(lambda: self.compute())
        self.shown.changed.connect(self._show_target)
        self.opacity.changed.connect(self._set_opacity)
        self.scale.changed.connect(lambda: self.compute() if self.overlays else None)
        self.lung_button.changed.connect(lambda: self.set_window("lung"))
        self.mediastinum_button.changed.connect(lambda: self.set_window("mediastinum"))
        self.nifti_button.changed.connect(lambda: self.export_nifti())
        self.png_button.changed.connect(lambda: self.save_png())
        viewer.layers.events.inserted.connect(self._layers_changed)
        viewer.layers.events.removed.connect(self._layers_changed)
        self._layers_changed()

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _cache_folder() -> Path | None:
        try:
            from lidc_cdam.cache import cache_dir

            return cache_dir() / "viewer" / "maps"
        except OSError:
            return None

    def _ct_choices(self, _widget=None) -> list[tuple[str, Any]]:
        from napari.layers import Image

        return [(layer.name, layer) for layer in self.viewer.layers
                if isinstance(layer, Image) and layer.ndim == 3 and not layer.rgb
                and (layer.metadata or {}).get(META_KEY, {}).get("kind") != "overlay"]

    def _layers_changed(self, event=None) -> None:
        self.ct_layer.reset_choices()
        choices = [c for c in self.ct_layer.choices if c is not None]
        if self.ct_layer.value is None and choices:
            self.ct_layer.value = choices[0]
        if self.ct_layer.value is not self._current_ct:
            self._on_ct_changed()
        for name, layer in list(self.overlays.items()):
            if layer not in self.viewer.layers:
                del self.overlays[name]

    def say(self, text: str, error: bool = False) -> None:
        self.status.value = ("Error: " if error else "") + text
        if error:
            with contextlib.suppress(Exception):
                from napari.utils.notifications import show_warning

                show_warning(text)

    @property
    def volume(self) -> CTVolume | None:
        layer = self.ct_layer.value
        return None if layer is None else volume_from_layer(layer)

    # ------------------------------------------------------------------ scan and nodules
    def open_scan(self, folder: Any) -> Any:
        """Read a DICOM series folder (its largest CT series, :func:`lidc_cdam.ct.read_ct`) into a CT layer; a
        clear message when it is not one or when the series is refused (MR, localizer, gantry tilt...)."""
        path = _path_or_none(folder)
        if path is None:
            self.say("choose a DICOM series folder first", error=True)
            return None
        try:
            volume = read_ct(path)
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
        self.models = {}
        for m in loaded:
            for t in m.targets:
                self.models.setdefault(t, m)
        choices = list(self.models)
        self.targets.reset_choices()
        self.targets.value = choices[:1]
        if loaded and loaded[0].view in ct.VIEWS:
            self.view.value = loaded[0].view
        if errors:
            self.say(" | ".join(errors), error=True)
        elif loaded:
            self.say(f"model(s) loaded: {', '.join(m.path.name + ' (' + m.task + ')' for m in loaded)}")

    # ------------------------------------------------------------------ computing
    def requests(self) -> list[ct.MapRequest]:
        nodule = self.nodule.value
        if nodule is None:
            raise CTError("choose a nodule (nodule table, then the list or 'Nodule under cursor')")
        targets = list(self.targets.value or [])
        if not targets:
            raise CTError("choose at least one target (load a checkpoint first)")
        by_model: dict[str, list[str]] = {}
        for t in targets:
            by_model.setdefault(str(self.models[t].path), []).append(t)
        return [ct.MapRequest(ck, str(nodule.crop_path), tuple(ts), ct.METHODS[self.method.value], self.view.value,
                             SLICE_MODES[self.slices.value], n=int(self.samples.value))
                for ck, ts in by_model.items()]

    def compute(self, block: bool = False) -> Any:
        """Compute the selected maps in a worker thread (``block``: in this thread, for scripts)."""
        self._t0 = time.perf_counter()
        volume = self.volume
        try:
            if volume is None:
                raise CTError("open a CT first")
            requests = self.requests()
        except CTError as err:
            self.say(str(err), error=True)
            return None
        crop = ct.read_crop(requests[0].crop_path)
        cache = self.cache
        scale = SCALES[self.scale.value]

        def work():
            results = []
            for n, req in enumerate(requests):
                steps = ct.cached_steps(req, cache)
                while True:
                    try:
                        done, total = next(steps)
                    except StopIteration as stop:
                        results.append(stop.value)
                        break
                    yield (n + done / max(total, 1)) / len(requests)
            placed = []
            for r in results:
                shown = [r.scaled(k, scale) for k in range(len(r.targets))]
                placed.append([(ct.place_on_scan(m, crop, volume), limit) for m, limit in shown])
            return results, placed

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
                self._show(stop.value, volume, crop, requests[0].crop_path)
            except Exception as err:
                self._failed(err)
            return None
        from napari.qt.threading import create_worker

        self.say("computing...")
        worker = create_worker(work, _start_thread=False)
        worker.yielded.connect(lambda f: setattr(self.progress, "value", int(100 * f)))
        worker.returned.connect(lambda out: self._show(out, volume, crop, requests[0].crop_path))
        worker.errored.connect(self._failed)
        worker.finished.connect(lambda: setattr(self.compute_button, "enabled", True))
        self.worker = worker
        worker.start()
        return worker

    def _failed(self, err: BaseException) -> None:
        self.compute_button.enabled = True
        self.progress.value = 0
        msg = str(err) if isinstance(err, CTError) else f"{type(err).__name__}: {err}"
        self.say(msg, error=True)

    def _show(self, out: tuple[list[ct.MapResult], list[list[tuple[np.ndarray, float]]]], volume: CTVolume,
              crop: dict[str, Any], crop_path: str) -> None:
        results, placed = out
        previous, self.overlays = self.overlays, {}
        method_label = {v: k for k, v in ct.METHODS.items()}
        for result, arrays in zip(results, placed, strict=True):
            for target, (arr, limit) in zip(result.targets, arrays, strict=True):
                name = f"{method_label[result.method]} {target} ({result.view})"
                meta = {META_KEY: {"kind": "overlay", "target": target, "nodule_id": result.nodule_id,
                                   "method": result.method, "view": result.view, "limit": limit,
                                   "crop_slices": result.slices}}
                limits = (-limit, limit) if result.signed else (0.0, limit)
                layer = previous.pop(target, None)
                if layer is not None and layer in self.viewer.layers:  # update in place: much faster
                    layer.data = arr
                    layer.colormap = cdam_colormap(result.signed)
                    layer.contrast_limits_range = limits
                    layer.contrast_limits = limits
                    layer.name = name
                    layer.metadata = meta
                else:
                    layer = self.viewer.add_image(
                        arr, name=name, colormap=cdam_colormap(result.signed), contrast_limits=limits,
                        opacity=float(self.opacity.value), blending="translucent", interpolation2d="nearest",
                        metadata=meta, **volume.layer_kwargs())
                self.overlays[target] = layer
        for layer in previous.values():
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        if CONTOURS in self.viewer.layers:  # the consensus outline stays visible on top of the maps
            index = self.viewer.layers.index(self.viewer.layers[CONTOURS])
            if index != len(self.viewer.layers) - 1:
                self.viewer.layers.move(index, len(self.viewer.layers))
        self.result = results[0] if results else None
        self.results = results
        self._crop_path = Path(crop_path)
        chosen = self.shown.value
        self.shown.reset_choices()
        if self.overlays:
            self.shown.value = chosen if chosen in self.overlays else next(iter(self.overlays))
            self._show_target()
        self.progress.value = 100
        self.compute_button.enabled = True
        self._focus(crop, results[0].view if results else self.view.value)
        self.predictions.value = self._prediction_text(results)
        self.last_seconds = time.perf_counter() - self._t0
        cached = all(r.cached for r in results)
        n_slices = len(results[0].slices) if results else 0
        self.say(f"{n_slices} slices, {len(self.overlays)} map(s) in {self.last_seconds:.2f} s"
                 + (" (cached)" if cached else "") + "; orange = evidence, blue = counter-evidence")

    def _prediction_text(self, results: list[ct.MapResult]) -> str:
        nodule = self.nodule.value
        row = nodule.row if nodule is not None else {}
        lines = []
        for r in results:
            for name, value in r.predictions.items():
                if name == ct.MALIGNANCY:
                    ref = row.get("label_name")
                    median = row.get("malignancy_median")
                    extra = f" (radiologists: {ref}" + (f", median {median:g}" if isinstance(median, float) and
                                                        not np.isnan(median) else "") + ")" if ref else ""
                    lines.append(f"malignancy: p = {value:.2f}{extra}")
                else:
                    ref = row.get(name)
                    extra = (f" (radiologists {float(ref):.1f})" if isinstance(ref, int | float) and
                             not np.isnan(float(ref)) else "")
                    lines.append(f"{name}: {value:.2f}{extra}")
        return "\n".join(lines) + ("\n(central slice of the crop)" if lines else "")

    def _focus(self, crop: dict[str, Any], view: str) -> None:
        """Slider and camera on the nodule, the view's plane displayed."""
        centre_xyz = ct.crop_centre_world(crop)
        centre = np.asarray(centre_xyz[::-1], dtype=float)  # world z, y, x
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
        for target, layer in self.overlays.items():
            layer.visible = target == chosen
            with contextlib.suppress(AttributeError):
                layer.colorbar.visible = target == chosen
        if chosen in self.overlays:
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
        """Every computed map (raw scores) as ``<nodule>_<method>_<view>_<target>.nii.gz`` on the scan's grid."""
        out = self._export_folder(folder)
        volume = self.volume
        if out is None or volume is None or not self.overlays:
            if out is not None:
                self.say("nothing to export: compute maps first", error=True)
            return []
        written = []
        crop = ct.read_crop(self._crop_path)
        for result in self.results:
            for k, target in enumerate(result.targets):
                name = f"{result.nodule_id}_{result.method}_{result.view}_{target}.nii.gz"
                raw = ct.place_on_scan(result.maps[k], crop, volume)  # raw scores, whatever the colour scale
                written.append(ct.export_nifti(raw, volume, out / name))
        self.say(f"wrote {len(written)} NIfTI map(s) to {out}")
        return written

    def save_png(self, path: Any = None) -> Path | None:
        """The current view (canvas) as a PNG."""
        target = _path_or_none(path)
        if target is None:
            folder = self._export_folder()
            if folder is None:
                return None
            nid = self.result.nodule_id if self.result is not None else "view"
            target = folder / f"{nid}_view.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        self.viewer.screenshot(str(target), canvas_only=True)
        self.say(f"saved {target}")
        return target
