"""The widget's input panels: the scan (CT layer, a DICOM folder and its series, or a CT file) and the models
(checkpoints, targets and concepts, method, samples, view, slices). They bind magicgui widgets to the controller."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from lidc_cdam.viewer._controller import SCAN_FILTER, path_or_none
from lidc_cdam.viewer._overlays import META_KEY
from lidc_cdam.viewer._reader import ct_layer_data
from magicgui.widgets import ComboBox, FileEdit, PushButton, Select, SpinBox

from lidc_cdam.ct.errors import CTError
from lidc_cdam.ct.inputs import VIEWS
from lidc_cdam.ct.maps import METHODS
from lidc_cdam.ct.volume import CTVolume

SLICE_MODES = {"nodule +- 3 slices": "nodule", "all 32 slices": "all"}  # at a point: its centre +- 3


class ScanPanel:
    """CT layer / DICOM folder / Series / Open series / CT file, bound to ``owner`` (the widget)."""

    def __init__(self, owner: Any):
        self.owner = owner
        self.ct_layer = ComboBox(label="CT layer", choices=self._ct_choices)
        self.scan_folder = FileEdit(label="DICOM folder", mode="d")
        self.series = ComboBox(label="Series", choices=lambda _w: self._series_choices(),
                               tooltip="the series of the folder; the largest CT series by default")
        self.open_button = PushButton(text="Open series")
        self.scan_file = FileEdit(label="CT file", mode="r", filter=SCAN_FILTER,
                                  tooltip="a NIfTI, NRRD, MHA / MHD or DICOM file (a series: its folder above)")
        self.widgets = [self.ct_layer, self.scan_folder, self.series, self.open_button, self.scan_file]
        self.scan_folder.changed.connect(lambda: self.list_series())
        self.open_button.changed.connect(lambda: self.open_scan(self.scan_folder.value))
        self.scan_file.changed.connect(lambda: self.open_scan(self.scan_file.value)
                                       if path_or_none(self.scan_file.value) else None)

    def _ct_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        from napari.layers import Image

        return [(layer.name, layer) for layer in self.owner.viewer.layers
                if isinstance(layer, Image) and layer.ndim == 3 and not layer.rgb
                and (layer.metadata or {}).get(META_KEY, {}).get("kind") not in ("overlay", "parametric-map")]

    def _series_choices(self) -> list[tuple[str, str]]:
        return [(f"{s.modality} {s.description or '(no description)'}: {s.size}"
                 + (" (localizer)" if s.localizer else ""), s.uid) for s in self.owner.controller.series]

    def list_series(self, folder: Any = None) -> list[Any]:
        """The series of a DICOM folder into the series chooser, the largest CT series chosen."""
        controller = self.owner.controller
        path = path_or_none(folder if folder is not None else self.scan_folder.value)
        controller.series = []
        if path is not None:
            try:
                controller.list_series(path)
            except CTError as err:
                self.owner.say(str(err), error=True)
        self.series.reset_choices()
        if controller.series:
            uid = controller.default_series()
            if uid is not None:
                self.series.value = uid
            self.owner.say(f"{len(controller.series)} series in {path}")
        return controller.series

    def open_scan(self, path: Any, series: str | int | None = None) -> Any:
        """Read a DICOM series folder (the chosen series, by default its largest CT series), a DICOM file or a
        NIfTI / NRRD / MHA file (:func:`lidc_cdam.ct.read_ct`) into a CT layer; a clear message when refused."""
        path = path_or_none(path)
        if path is None:
            self.owner.say("choose a DICOM series folder or a CT file first", error=True)
            return None
        found = self.owner.controller.series
        if series is None and found and found[0].folder.is_relative_to(path):
            series = self.series.value
        try:
            volume = self.owner.controller.read(path, series)
        except CTError as err:
            self.owner.say(str(err), error=True)
            return None
        return self.add_ct(volume)

    def add_ct(self, volume: CTVolume, crops_dir: str | Path | None = None) -> Any:
        """``volume`` as a CT layer, chosen (its warnings go to the status line)."""
        data, kwargs, _ = ct_layer_data(volume, **({"crops_dir": str(crops_dir)} if crops_dir else {}))
        layer = self.owner.viewer.add_image(data, **kwargs)
        self.ct_layer.value = layer
        return layer


def device_choices() -> list[str]:
    """``auto``, ``cpu`` and each CUDA device of this machine (the device policy of :mod:`lidc_cdam.device`)."""
    import torch

    return ["auto", "cpu", *(f"cuda:{k}" for k in range(torch.cuda.device_count()))]


class ModelPanel:
    """Checkpoint(s) / Targets / Concept examples / Method / Samples / View / Slices, bound to ``owner``."""

    def __init__(self, owner: Any):
        self.owner = owner
        self.checkpoints = FileEdit(label="Checkpoint(s)", mode="rm", filter="*.pt *.pth *.safetensors",
                                    tooltip="one model per task, or the folds of one task (an ensemble)")
        self.targets = Select(label="Targets", choices=lambda _w: owner.controller.target_choices(),
                              tooltip="the models' outputs, and radiological concepts (concept CDAM, Eq. 4: the "
                                      "mean latent of the training-fold nodules rated so)")
        self.concept_data = FileEdit(label="Concept examples", mode="d",
                                     tooltip="the rated nodules for concepts: a `lidc-cdam preprocess` or `phantoms` "
                                             "folder (nodules.csv + crops/); only the checkpoint's training fold is "
                                             "used (default: the nodule table)")
        self.method = ComboBox(label="Method", choices=list(METHODS), value="CDAM")
        self.samples = SpinBox(label="Samples (Smooth/Integrated)", value=50, min=2, max=500)
        self.view = ComboBox(label="View", choices=list(VIEWS), value="axial")
        self.slices = ComboBox(label="Slices", choices=list(SLICE_MODES), value="nodule +- 3 slices",
                               tooltip="at a point: its centre slice +- 3")
        self.device = ComboBox(label="Device", choices=device_choices(), value="auto",
                               tooltip="where the models run: auto takes the GPU where there is one")
        with contextlib.suppress(AttributeError):
            self.targets.native.setMaximumHeight(150)
        self.widgets = [self.checkpoints, self.targets, self.concept_data, self.method, self.samples, self.view,
                        self.slices, self.device]
        self.checkpoints.changed.connect(lambda: self.load_checkpoints())
        self._loader: Any = None

    def settings(self) -> dict[str, Any]:
        """The keyword arguments of :meth:`CdamController.plan` chosen here."""
        return {"method": METHODS[self.method.value], "view": self.view.value,
                "slices": SLICE_MODES[self.slices.value], "samples": int(self.samples.value),
                "device": self.device.value}

    def load_checkpoints(self, paths: Any = None, block: bool = False) -> Any:
        """Load and check the checkpoints (in a worker thread unless ``block``); fill the targets."""
        value = self.checkpoints.value if paths is None else paths
        if isinstance(value, str | Path):
            value = [value]
        files = [Path(p) for p in (value or ()) if path_or_none(p) is not None]
        load = self.owner.controller.load
        if block:
            self._loaded(load(files))
            return None
        from napari.qt.threading import create_worker

        self.owner.say("loading checkpoint(s)...")
        worker = create_worker(load, files, _start_thread=False)
        worker.returned.connect(self._loaded)
        worker.errored.connect(lambda err: self.owner.say(f"{type(err).__name__}: {err}", error=True))
        worker.start()
        self._loader = worker
        return worker

    def _loaded(self, out: tuple[list[Any], list[str]]) -> None:
        loaded, errors = out
        tasks = self.owner.controller.set_models(loaded)
        self.targets.reset_choices()
        self.targets.value = list(self.owner.controller.models)[:1]
        if loaded and loaded[0].view in VIEWS:
            self.view.value = loaded[0].view
        if errors:
            self.owner.say(" | ".join(errors), error=True)
        elif loaded:
            self.owner.say(f"model(s) loaded: {tasks}")
