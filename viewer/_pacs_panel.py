"""The PACS panel: a DICOMweb server, search fields, a table of studies and series, *Open* (progress, *Cancel*),
and *Send results to PACS*. Qt and magicgui only; the work is :class:`~lidc_cdam.viewer._pacs.PacsActions`'."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from lidc_cdam.viewer._pacs import COLUMNS, PacsActions
from magicgui.widgets import LineEdit, PushButton, Table

from lidc_cdam.ct.errors import CTError


class PacsPanel:
    """PACS URL / Patient ID / Accession / Study date / Search / the table / Open / Cancel / Send, bound to
    ``owner`` (the dock widget: its status line, progress bar and :meth:`add_ct`)."""

    def __init__(self, owner: Any):
        self.owner = owner
        self.actions = PacsActions(owner.controller)
        self.pacs_url = LineEdit(label="PACS (DICOMweb)", value=os.environ.get("LIDC_CDAM_PACS_URL", ""),
                                 tooltip="the server's DICOMweb root; user and password come from "
                                         "LIDC_CDAM_PACS_USER / LIDC_CDAM_PACS_PASSWORD, LIDC_CDAM_PACS_TOKEN or netrc")
        self.pacs_patient = LineEdit(label="Patient ID")
        self.pacs_accession = LineEdit(label="Accession")
        self.pacs_date = LineEdit(label="Study date", tooltip="YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
        self.pacs_search_button = PushButton(text="Search PACS")
        self.pacs_table = Table(value={c: [] for c in COLUMNS}, label="Studies")
        self.pacs_open_button = PushButton(text="Open from PACS")
        self.pacs_cancel_button = PushButton(text="Cancel download", enabled=False)
        self.pacs_send_button = PushButton(text="Send results to PACS")
        with contextlib.suppress(AttributeError, ImportError):
            from qtpy.QtWidgets import QAbstractItemView

            self.pacs_table.native.setMaximumHeight(160)
            self.pacs_table.native.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.widgets = [self.pacs_url, self.pacs_patient, self.pacs_accession, self.pacs_date, self.pacs_search_button,
                        self.pacs_table, self.pacs_open_button, self.pacs_cancel_button, self.pacs_send_button]
        self.pacs_search_button.changed.connect(lambda: self.search())
        self.pacs_open_button.changed.connect(lambda: self.open())
        self.pacs_cancel_button.changed.connect(lambda: self.actions.cancel.set())
        self.pacs_send_button.changed.connect(lambda: self.send())
        self.worker: Any = None

    def search(self) -> list[Any]:
        """The studies and series matching the fields, in the table (the first row chosen)."""
        try:
            rows = self.actions.search(self.pacs_url.value, patient=self.pacs_patient.value,
                                       accession=self.pacs_accession.value, study_date=self.pacs_date.value)
        except CTError as err:
            self.owner.say(str(err), error=True)
            return []
        self.pacs_table.value = {c: [r.cells()[k] for r in rows] for k, c in enumerate(COLUMNS)}
        with contextlib.suppress(AttributeError):
            if rows:
                self.pacs_table.native.selectRow(0)
        self.owner.say(f"{len(rows)} series found" if rows else "no study found")
        return rows

    def chosen_row(self) -> Any:
        rows = self.actions.rows
        k = 0
        with contextlib.suppress(AttributeError):
            k = max(self.pacs_table.native.currentRow(), 0)
        if not rows or k >= len(rows):
            raise CTError("search the PACS and choose a series first")
        return rows[k]

    def open(self, block: bool = False) -> Any:
        """Fetch the chosen series into the cache (a worker thread unless ``block``; progress, Cancel) and show it."""
        try:
            row = self.chosen_row()
            steps = self.actions.open_steps(self.pacs_url.value, row)
        except CTError as err:
            self.owner.say(str(err), error=True)
            return None
        owner = self.owner
        owner.progress.value = 0

        def shown(volume: Any) -> None:
            self.pacs_cancel_button.enabled = False
            if volume is not None:
                owner.add_ct(volume)
                owner.say(f"opened {row.series} ({row.slices} slices) of {row.patient} from the PACS")

        def work():
            try:
                while True:
                    done, total = next(steps)
                    yield int(100 * done / max(total, 1))
            except StopIteration as stop:
                return stop.value

        if block:
            gen = work()
            try:
                while True:
                    owner.progress.value = next(gen)
            except StopIteration as stop:
                shown(stop.value)
            except CTError as err:
                owner.say(str(err), error=True)
            return None
        from napari.qt.threading import create_worker

        worker = create_worker(work, _start_thread=False)
        worker.yielded.connect(lambda v: setattr(owner.progress, "value", v))
        worker.returned.connect(shown)
        worker.errored.connect(lambda err: (owner.say(str(err), error=True),
                                            setattr(self.pacs_cancel_button, "enabled", False)))
        self.worker = worker
        self.pacs_cancel_button.enabled = True
        owner.say(f"fetching {row.series} from the PACS...")
        worker.start()
        return worker

    def send(self) -> list[Any]:
        """Store the shown point's Parametric Maps, Segmentation and SR on the PACS (STOW-RS)."""
        try:
            reports = self.actions.send(self.pacs_url.value or None)
        except CTError as err:
            self.owner.say(str(err), error=True)
            return []
        self.owner.say("; ".join(r.line() for r in reports))
        return reports
