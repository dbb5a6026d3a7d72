"""The widget's "where" panel: explain at clicked points (the *CDAM points* layer) or at a table nodule (a
``lidc-cdam preprocess`` folder, its nodules' contours drawn); it gives the controller the jobs to explain."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
from lidc_cdam.viewer._controller import Job, path_or_none
from lidc_cdam.viewer._display_panel import CONTOURS
from lidc_cdam.viewer._overlays import META_KEY
from lidc_cdam.viewer._points import find_points_layer, make_points_layer, point_label, point_lps
from magicgui.widgets import CheckBox, ComboBox, FileEdit, PushButton, RadioButtons

from lidc_cdam.ct.errors import CTError

POINT_MODE, TABLE_MODE = "at points", "table nodule"
CONTOUR_COLOUR = "#39ff14"  # green: not a colour of the CDAM scale


class WherePanel:
    """Explain (at points / table nodule), the points' widgets and the nodule table's, bound to ``owner``."""

    def __init__(self, owner: Any):
        self.owner = owner
        self.viewer = owner.viewer
        self.mode = RadioButtons(label="Explain", choices=[POINT_MODE, TABLE_MODE], value=POINT_MODE,
                                 orientation="horizontal")
        self.points_button = PushButton(text="Add points (click on the scan)")
        self.on_click = CheckBox(text="Explain on click", value=True)
        self.point = ComboBox(label="Point", choices=lambda _w: self._point_choices())
        self.all_points_button = PushButton(text="Explain all points")
        self.crops_dir = FileEdit(label="Nodule table", mode="d",
                                  tooltip="output folder of `lidc-cdam preprocess` (nodules.csv + crops/)")
        self.nodule = ComboBox(label="Nodule", choices=lambda _w: [(n.label, n) for n in owner.controller.nodules])
        self.cursor_button = PushButton(text="Nodule under cursor")
        self._point_widgets = [self.points_button, self.on_click, self.point, self.all_points_button]
        self._table_widgets = [self.crops_dir, self.nodule, self.cursor_button]
        self.widgets = [self.mode, *self._point_widgets, *self._table_widgets]
        self.mode_changed()
        self.mode.changed.connect(self.mode_changed)
        self.points_button.changed.connect(lambda: self.points_layer())
        self.point.changed.connect(lambda: owner.compute() if self.point.value is not None and owner.ready() else None)
        self.all_points_button.changed.connect(lambda: owner.compute(all_points=True))
        self.crops_dir.changed.connect(lambda: self.load_nodules())
        self.cursor_button.changed.connect(self.nodule_under_cursor)

    def mode_changed(self, *_: Any) -> None:
        at_points = self.mode.value == POINT_MODE
        for w in self._point_widgets:
            w.visible = at_points
        for w in self._table_widgets:
            w.visible = not at_points

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
            self.owner.say("click on the scan to add a point (the 'CDAM points' layer is in add mode)")
        return layer

    def refresh_points(self) -> None:
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
        self.refresh_points()
        layer = find_points_layer(self.viewer)
        if action == "added" and layer is not None and len(layer.data):
            self.mode.value = POINT_MODE
            with self.point.changed.blocked():
                self.point.value = len(layer.data) - 1
            if self.on_click.value:
                self.owner.compute()

    def add_point(self, world_zyx: Any, compute: bool = True, block: bool = False) -> Any:
        """Add a point (napari world z, y, x mm) as a click would, choose it, and explain it unless not
        ``compute`` (``block``: in this thread; for scripts and tests)."""
        layer = find_points_layer(self.viewer) or self.points_layer()
        with layer.events.data.blocker():
            layer.add(np.asarray(world_zyx, dtype=float)[None])
        self.refresh_points()
        with self.point.changed.blocked():
            self.point.value = len(layer.data) - 1
        return self.owner.compute(block=block) if compute else None

    def jobs(self, all_points: bool = False) -> list[Job]:
        """What to explain: the chosen table nodule, or the chosen point (every point with ``all_points``) as
        (label, LPS mm)."""
        if self.mode.value == TABLE_MODE:
            nodule = self.nodule.value
            if nodule is None:
                raise CTError("choose a nodule (nodule table, then the list or 'Nodule under cursor')")
            return [(nodule.nodule_id, nodule)]
        layer = find_points_layer(self.viewer)
        data = np.asarray(layer.data) if layer is not None else np.empty((0, 3))
        if not len(data):
            return []
        if all_points:
            return [(point_label(k, p), point_lps(p)) for k, p in enumerate(data)]
        k = self.point.value if self.point.value is not None else len(data) - 1
        if not 0 <= k < len(data):
            raise CTError("choose a point")
        return [(point_label(k, data[k]), point_lps(data[k]))]

    # ------------------------------------------------------------------ table nodules
    def load_nodules(self) -> list[Any]:
        """The nodules of the nodule table whose crops lie in the selected CT; their contours as labels."""
        folder = path_or_none(self.crops_dir.value)
        controller = self.owner.controller
        volume = controller.volume
        if folder is None or volume is None:
            return []
        try:
            controller.load_nodules(folder)
        except CTError as err:
            self.owner.say(str(err), error=True)
            controller.nodules = []
        self.nodule.reset_choices()
        if not controller.nodules:
            self.owner.say(f"no nodule of {folder} lies in {volume.name} (crops from another scan?)", error=True)
            return []
        self.mode.value = TABLE_MODE
        labels = controller.nodule_labels()
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
        self.owner.say(f"{len(controller.nodules)} nodule(s) in this scan")
        return controller.nodules

    def nodule_under_cursor(self, *_: Any) -> Any:
        """Select the nodule whose crop centre is nearest to the mouse cursor (within 16 mm)."""
        pos = np.asarray(self.viewer.cursor.position, dtype=float)[-3:]
        found = self.owner.controller.nodule_at(pos[::-1])
        if found is None:
            self.owner.say("no nodule of the table within 16 mm of the cursor", error=True)
            return None
        self.mode.value = TABLE_MODE
        self.nodule.value = found
        self.owner.say(f"nodule {found.nodule_id}")
        return found
