"""The viewer's PACS actions without Qt: search a DICOMweb server, open a series from it, send results back.

A thin layer over :mod:`lidc_cdam.ct.pacs` and :mod:`lidc_cdam.ct.outputs` (the panel, :mod:`._pacs_panel`, runs
these in a worker thread and shows the rows, the progress and the status). Credentials come from the environment
or netrc (``LIDC_CDAM_PACS_USER`` / ``LIDC_CDAM_PACS_PASSWORD``, ``LIDC_CDAM_PACS_TOKEN``), never from the panel.

- :meth:`PacsActions.search` - studies and their series (QIDO-RS) as table rows, one per series;
- :meth:`PacsActions.open_steps` - the chosen series fetched (WADO-RS) into the cache keyed by SeriesInstanceUID,
  yielding ``(done, total)`` instances (cancel: a :class:`threading.Event`), then read as the scan;
- :meth:`PacsActions.send` - the shown point's results written with DICOM results (the controller's export) and
  stored by STOW-RS on the server the scan came from (or another).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lidc_cdam.ct.errors import CTError
from lidc_cdam.ct.volume import CTVolume

#: the table's columns
COLUMNS = ("patient", "date", "accession", "study", "modality", "slices", "series")


@dataclass
class Row:
    """One series of a study found on the server (one table row)."""

    patient: str
    date: str
    accession: str
    study: str
    modality: str
    slices: str
    series: str
    study_uid: str
    series_uid: str

    def cells(self) -> list[str]:
        return [getattr(self, c) for c in COLUMNS]


class PacsActions:
    """Search, open and send for a :class:`~lidc_cdam.viewer._controller.CdamController`."""

    def __init__(self, controller: Any):
        self.controller = controller
        self.rows: list[Row] = []
        self.opened: dict[str, Any] | None = None  # where the shown scan came from (``Fetched.as_source()``)
        self.cancel = threading.Event()

    @staticmethod
    def server(url: str, insecure: bool = False) -> Any:
        from lidc_cdam.ct.pacs import connect

        if not str(url or "").strip():
            raise CTError("enter the PACS's DICOMweb URL (e.g. https://pacs.example.org/dicom-web)")
        return connect(str(url).strip(), insecure=insecure)

    def search(self, url: str, *, patient: str = "", accession: str = "", study_date: str = "",
               modality: str = "CT") -> list[Row]:
        """The studies matching the filters and their series, one row per series (QIDO-RS)."""
        from lidc_cdam.ct.pacs import find_studies

        server = self.server(url)
        filters = {k: v.strip() for k, v in (("patient", patient), ("accession", accession),
                                              ("study_date", study_date), ("modality", modality)) if v and v.strip()}
        rows = []
        for study in find_studies(server, **filters):
            for s in study.series:
                date = f"{study.date[:4]}-{study.date[4:6]}-{study.date[6:8]}" if len(study.date) == 8 else "-"
                rows.append(Row(study.patient_id or "-", date, study.accession or "-",
                                study.description or "-", s.modality or "?",
                                "?" if s.n_instances is None else str(s.n_instances), s.description or "-",
                                study.uid, s.uid))
        self.rows = rows
        return rows

    def open_steps(self, url: str, row: Row) -> Generator[tuple[int, int], None, CTVolume]:
        """Fetch ``row``'s series into the cache (resumable; nothing fetched again when complete), yielding
        ``(done, total)`` instances; returns the scan (:func:`lidc_cdam.ct.read_ct` of the cached series)."""
        from lidc_cdam.ct.pacs import fetch_steps
        from lidc_cdam.ct.read import read_ct

        self.cancel.clear()
        fetched = yield from fetch_steps(self.server(url), row.study_uid, row.series_uid, cancel=self.cancel)
        volume = read_ct(fetched.folder)
        self.opened = fetched.as_source()
        volume.meta["pacs"] = self.opened["pacs"]
        return volume

    def send(self, url: str | None = None, folder: str | Path | None = None) -> list[Any]:
        """Write the shown point's results with DICOM results (Parametric Maps, Segmentation, SR) into ``folder``
        (default: a new folder under the lidc-cdam cache) and store them by STOW-RS on ``url`` (default: the server
        the scan came from); the reports say what was stored (:class:`~lidc_cdam.ct.pacs.StoreError` otherwise)."""
        from lidc_cdam.ct.pacs import send_results
        from lidc_cdam.ct.pacs.fetch import cache_root

        url = url or (self.opened or {}).get("pacs", {}).get("url")
        if not url:
            raise CTError("no PACS to send to: enter its DICOMweb URL (or open the scan from it)")
        volume = self.controller.volume
        uid = (volume.meta.get("series_instance_uid") if volume is not None else None) or "scan"
        out = Path(folder) if folder else cache_root() / "outbox" / f"{uid}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.controller.export(out, dicom=True)
        return send_results(out, stow=[self.server(url)])
