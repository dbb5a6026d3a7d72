"""The widget's display panel: which overlay is shown, which models, the colour scale, opacity, CT windows and the
predictions; it draws what the controller explained (one overlay layer per target) and puts the camera on it."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
from lidc_cdam.viewer._controller import Explained
from lidc_cdam.viewer._overlays import (
    META_KEY,
    Overlay,
    OverlayLayers,
    agreement_colormap,
    cdam_colormap,
    crop_affine,
    world_to_crop_index,
)
from lidc_cdam.viewer._text import prediction_text, training_text
from magicgui.widgets import ComboBox, FloatSlider, Label, PushButton

from lidc_cdam.ct.crop import CROP
from lidc_cdam.ct.inputs import CENTRE, VIEWS
from lidc_cdam.ct.maps import METHODS, display_scaled
from lidc_cdam.ct.volume import window_limits, window_text

SCALES = {"each slice on its own": "slice", "shared by all slices": "nodule"}
ENSEMBLE, AGREEMENT = "ensemble mean", "sign agreement of the folds"
#: napari dims order that shows each view's plane, the slider stepping along the view axis
DIMS_ORDER = {"axial": (0, 1, 2), "coronal": (1, 0, 2), "sagittal": (2, 0, 1)}
CONTOURS = "nodule contours"
FIELD_MM = 120.0  # field of view around the nodule after computing
METHOD_LABEL = {v: k for k, v in METHODS.items()}


class DisplayPanel:
    """Show / Models / Colour scale / Opacity / window presets / Predictions, bound to ``owner`` (the widget:
    its viewer, controller and CT layer)."""

    def __init__(self, owner: Any):
        self.owner = owner
        self.viewer = owner.viewer
        self.overlay_layers = OverlayLayers(self.viewer)
        self.shown = ComboBox(label="Show", choices=lambda _w: list(self.overlays))
        self.models_shown = ComboBox(label="Models", choices=lambda _w: self._model_choices(),
                                     tooltip="the folds' mean map, their sign agreement, or one fold")
        self.scale = ComboBox(label="Colour scale", choices=list(SCALES), value="each slice on its own",
                              tooltip="symmetric limits per slice (as in the paper) or one limit for the nodule")
        self.opacity = FloatSlider(label="Opacity", min=0.0, max=1.0, value=0.8)
        self.lung_button = PushButton(text=f"Lung window ({window_text('lung')})")
        self.mediastinum_button = PushButton(text="Mediastinum window (W400/L40)")
        self.predictions = Label(label="Predictions", value="")
        self.training = Label(label="Trained on", value="")
        with contextlib.suppress(AttributeError):
            self.predictions.native.setWordWrap(True)
            self.training.native.setWordWrap(True)
        self.widgets = [self.shown, self.models_shown, self.scale, self.opacity, self.lung_button,
                        self.mediastinum_button, self.predictions, self.training]
        self.shown.changed.connect(self.show_target)
        self.models_shown.changed.connect(self.render)
        self.opacity.changed.connect(self._set_opacity)
        self.scale.changed.connect(self.render)
        self.lung_button.changed.connect(lambda: self.set_window("lung"))
        self.mediastinum_button.changed.connect(lambda: self.set_window("mediastinum"))
        self.viewer.dims.events.current_step.connect(self.update_predictions)

    @property
    def explained(self) -> Explained | None:
        return self.owner.controller.explained

    @property
    def overlays(self) -> dict[str, Any]:
        """The overlay layers by target."""
        return self.overlay_layers.layers

    def _model_choices(self) -> list[str]:
        explained = self.explained
        folds = max((e.n for e in explained.ensembles), default=1) if explained is not None else 1
        if folds <= 1:
            return [ENSEMBLE]
        return [ENSEMBLE, AGREEMENT, *(f"fold {i + 1}" for i in range(folds))]

    def show_explained(self) -> None:
        """Draw the controller's explained crop, put the slider and camera on it, list its predictions."""
        explained = self.explained
        if explained is None:
            return
        self.models_shown.reset_choices()
        if self.models_shown.value is None:
            self.models_shown.value = ENSEMBLE
        self.render()
        view = explained.ensembles[0].view if explained.ensembles else self.owner.view.value
        self.focus(explained.crop, view)
        self.update_predictions()

    def render(self, *_: Any) -> None:
        """The overlays of the shown crop, one per target, from the choice of models and colour scale."""
        explained = self.explained
        if explained is None:
            return
        which = self.models_shown.value or ENSEMBLE
        scale = SCALES[self.scale.value]
        affine = crop_affine(explained.crop)
        fold = int(which.split()[1]) - 1 if which.startswith("fold ") else None
        overlays = []
        for ens in explained.ensembles:
            for k, target in enumerate(ens.targets):
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
        layers = self.viewer.layers
        if CONTOURS in layers:  # the consensus outline stays visible on top of the maps
            index = layers.index(layers[CONTOURS])
            if index != len(layers) - 1:
                layers.move(index, len(layers))
        chosen = self.shown.value
        self.shown.reset_choices()
        if self.overlays:
            self.shown.value = chosen if chosen in self.overlays else next(iter(self.overlays))
            self.show_target()

    def slice_under_slider(self) -> int | None:
        """The crop slice (along the shown view) at the viewer's current position, None outside the crop."""
        explained = self.explained
        if explained is None or not explained.ensembles or len(self.viewer.dims.point) < 3:
            return None
        index = world_to_crop_index(explained.crop, self.viewer.dims.point)
        s = round(float(index[VIEWS.get(explained.ensembles[0].view, 0)]))  # a 3D model's maps: along z
        return s if 0 <= s < CROP else None

    def update_predictions(self, *_: Any) -> None:
        """The predictions panel (the warnings go to the status line: :mod:`lidc_cdam.ct.outputs`)."""
        explained = self.explained
        if explained is None:
            return
        text, _ = prediction_text(explained.ensembles, explained.ratings, self.slice_under_slider(),
                                  explained.padded_share)
        self.predictions.value = text
        provenance, phantom = training_text(explained.ensembles)
        self.training.value = "\n".join([phantom, provenance] if phantom else [provenance])
        with contextlib.suppress(AttributeError):  # the phantom warning in red, as on the report page
            self.training.native.setStyleSheet("color: #e0404f; font-weight: bold;" if phantom else "")

    def focus(self, crop: dict[str, Any], view: str) -> None:
        """Slider on the crop's central slice along the view (the one predicted), camera on the crop's centre,
        the view's plane displayed."""
        view = view if view in VIEWS else "axial"  # a 3D model's map is a volume: shown axially
        index = np.full(3, (CROP - 1) / 2.0)
        index[VIEWS[view]] = CENTRE
        centre = (crop_affine(crop) @ np.append(index, 1.0))[:3]  # world z, y, x
        viewer = self.viewer
        ndim = viewer.dims.ndim
        if ndim < 3:
            return
        viewer.dims.order = tuple(range(ndim - 3)) + tuple(ndim - 3 + a for a in DIMS_ORDER[view])
        viewer.dims.set_point(range(ndim - 3, ndim), centre.tolist())
        displayed = list(viewer.dims.displayed)
        viewer.reset_view()
        world = np.asarray(viewer.layers.extent.world)  # [2, ndim]
        extent = float((world[1] - world[0])[displayed].max())
        camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari 0.9
        camera.center = tuple(centre[[d - (ndim - 3) for d in displayed]])
        camera.zoom = camera.zoom * max(extent / FIELD_MM, 1.0)

    def show_target(self, *_: Any) -> None:
        chosen = self.shown.value
        for target, layer in self.overlays.items():  # each setter redraws: set only what changes
            if layer.visible != (target == chosen):
                layer.visible = target == chosen
            with contextlib.suppress(AttributeError):
                if layer.colorbar.visible != (target == chosen):
                    layer.colorbar.visible = target == chosen
        selection = self.viewer.layers.selection
        if chosen in self.overlays and selection.active is not self.overlays[chosen]:
            selection.active = self.overlays[chosen]

    def _set_opacity(self, *_: Any) -> None:
        for layer in self.overlays.values():
            layer.opacity = float(self.opacity.value)

    def set_window(self, name: str) -> None:
        layer = self.owner.ct_layer.value
        if layer is not None:
            layer.contrast_limits = window_limits(name)
