"""Store a run's DICOM results on a PACS: STOW-RS (DICOMweb) or DIMSE C-STORE (pynetdicom).

- :func:`result_files`: the Parametric Maps, Segmentations and the Structured Report a run wrote (its summary's
  ``"dicom"`` key), maps and segmentations first, the report (which references them) last;
- :func:`store_stow` ``(server, files)`` / :func:`store_scp` ``("AET@HOST:PORT", files)``: send them one instance
  at a time, stopping at the first failure of the connection or of the rights (the rest would fail alike), and
  return a :class:`StoreReport` (each file: stored or not, why, bytes);
- :func:`send_results` ``(out, stow=[...], scp=[...])``: all of it for a run folder; writes ``pacs_store.json``
  (what was stored where, never credentials) and raises :class:`StoreError` naming what was and was not stored
  when anything failed. The local copies are written before and stay.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lidc_cdam.ct.pacs.client import DEFAULT_TIMEOUT, PacsError, Server, calling, quiet_libraries
from lidc_cdam.io import write_json

STORE_RECORD = "pacs_store.json"
DEFAULT_AET = "LIDC_CDAM"


@dataclass
class Sent:
    """One file: its path (relative to the run folder), SOP Instance UID, bytes, stored or not and why not."""

    path: str
    sop_instance_uid: str
    bytes: int
    stored: bool = False
    reason: str = ""


@dataclass
class StoreReport:
    """What one destination received: ``protocol`` (``STOW-RS`` or ``DIMSE C-STORE``), each file, seconds."""

    destination: str
    protocol: str
    files: list[Sent] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def stored(self) -> list[Sent]:
        return [f for f in self.files if f.stored]

    @property
    def failed(self) -> list[Sent]:
        return [f for f in self.files if not f.stored]

    @property
    def bytes_sent(self) -> int:
        return sum(f.bytes for f in self.stored)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "n_stored": len(self.stored), "n_failed": len(self.failed),
                "bytes_sent": self.bytes_sent}

    def line(self) -> str:
        """One line: how many were stored where, and why the others were not."""
        text = (f"{self.destination} ({self.protocol}): stored {len(self.stored)} of {len(self.files)} DICOM "
                f"result(s), {self.bytes_sent / 1e6:.2f} MB in {self.seconds:.1f} s")
        if self.failed:
            names = ", ".join(f.path for f in self.failed[:6]) + (" ..." if len(self.failed) > 6 else "")
            text += f"; NOT stored: {names} ({self.failed[0].reason})"
        return text


class StoreError(PacsError):
    """Some results were not stored; ``reports`` say which were and which were not."""

    def __init__(self, message: str, reports: Sequence[StoreReport]):
        super().__init__(message)
        self.reports = list(reports)


def result_files(out: str | Path, summary: dict[str, Any] | None = None) -> list[Path]:
    """The DICOM results of the run in ``out`` (from ``summary`` or its ``summary.json``): each point's Parametric
    Maps and Segmentation, then the Structured Report. :class:`PacsError` when the run wrote none."""
    out = Path(out)
    if summary is None:
        try:
            summary = json.loads((out / "summary.json").read_text())
        except (OSError, ValueError) as err:
            raise PacsError(f"{out}: no readable summary.json of a run ({err})") from None
    listed = summary.get("dicom") or {}
    if not listed:
        raise PacsError(f"{out}: this run wrote no DICOM results (run with --dicom)")
    files = [out / pid / rel for pid, rels in listed.items() if pid != "structured_report" for rel in rels]
    files += [out / rel for rel in listed.get("structured_report", [])]
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise PacsError(f"{out}: DICOM result file(s) missing: {absent[:4]}")
    return files


def _read(path: Path) -> Any:
    import pydicom

    return pydicom.dcmread(path)


def _relative(path: Path, out: Path | None) -> str:
    if out is not None:
        try:
            return str(path.relative_to(out))
        except ValueError:
            pass
    return str(path)


def store_stow(server: Server, files: Sequence[Path], *, out: Path | None = None,
               progress: Callable[[int, int], None] | None = None) -> StoreReport:
    """Send ``files`` to ``server`` by STOW-RS, one instance per request; stops at the first failure."""
    start = time.perf_counter()
    report = StoreReport(server.url, "STOW-RS")
    failure = ""
    for n, path in enumerate(files):
        ds = _read(path)
        sent = Sent(_relative(path, out), str(ds.SOPInstanceUID), path.stat().st_size)
        report.files.append(sent)
        if failure:
            sent.reason = failure
            continue
        try:
            with calling(f"storing {sent.path} (STOW-RS)", server):
                answer = server.client.store_instances([ds])
        except PacsError as err:
            failure = sent.reason = str(err)
            continue
        refused = [item for item in answer.get("FailedSOPSequence", [])
                   if str(item.get("ReferencedSOPInstanceUID", "")) == sent.sop_instance_uid]
        if refused:
            sent.reason = f"{server.url}: refused {sent.path} (failure reason {refused[0].get('FailureReason', '?')})"
        else:
            sent.stored = True
        if progress is not None:
            progress(n + 1, len(files))
    report.seconds = time.perf_counter() - start
    return report


def parse_scp(text: str) -> tuple[str, str, int]:
    """``AET@HOST:PORT`` as ``(called AE title, host, port)``; :class:`PacsError` when malformed."""
    aet, at, rest = text.rpartition("@")
    host, colon, port = rest.rpartition(":")
    if not (at and colon and aet and host and port.isdigit() and 0 < int(port) < 65536 and len(aet) <= 16):
        raise PacsError(f"--store-scp {text!r}: expected AET@HOST:PORT, e.g. ORTHANC@pacs.example.org:4242 (the "
                        "called AE title, at most 16 characters)")
    return aet, host.strip("[]"), int(port)


def store_scp(target: str, files: Sequence[Path], *, out: Path | None = None, calling_aet: str = DEFAULT_AET,
              timeout: float = DEFAULT_TIMEOUT, progress: Callable[[int, int], None] | None = None) -> StoreReport:
    """Send ``files`` to ``target`` (``AET@HOST:PORT``) by DIMSE C-STORE in one association."""
    from pynetdicom import AE

    quiet_libraries()
    called, host, port = parse_scp(target)
    start = time.perf_counter()
    report = StoreReport(f"{called}@{host}:{port}", "DIMSE C-STORE")
    datasets = [_read(p) for p in files]
    for path, ds in zip(files, datasets, strict=True):
        report.files.append(Sent(_relative(path, out), str(ds.SOPInstanceUID), path.stat().st_size))
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    for sop_class, syntax in dict.fromkeys((str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
                                           for ds in datasets):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(host, port, ae_title=called)
    failure = ""
    if not assoc.is_established:
        why = ("the association was rejected (is the called AE title right, and is this AE title allowed?)"
               if assoc.is_rejected else "cannot connect, or the association was aborted (the server is down, the "
               "host or port is wrong, or it dropped the connection)")
        failure = f"{report.destination}: storing by C-STORE failed: {why}"
    try:
        for n, (sent, ds) in enumerate(zip(report.files, datasets, strict=True)):
            if failure:
                sent.reason = failure
                continue
            status = assoc.send_c_store(ds)
            code = int(status.Status) if status is not None and "Status" in status else None
            if code is None:
                failure = sent.reason = (f"{report.destination}: storing {sent.path} by C-STORE failed: no answer "
                                         "(timed out or the connection was lost)")
            elif code == 0 or 0xB000 <= code <= 0xB0FF:  # success, or success with a warning
                sent.stored = True
            else:
                sent.reason = f"{report.destination}: C-STORE of {sent.path} refused (status 0x{code:04X})"
            if progress is not None:
                progress(n + 1, len(files))
    finally:
        if assoc.is_established:
            assoc.release()
    report.seconds = time.perf_counter() - start
    return report


def send_results(out: str | Path, *, summary: dict[str, Any] | None = None, stow: Sequence[Server] = (),
                 scp: Sequence[str] = (), progress: Callable[[int, int], None] | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> list[StoreReport]:
    """Store the run's DICOM results (:func:`result_files`) on every destination; write ``out/pacs_store.json``;
    :class:`StoreError` when any file was not stored somewhere (the message says what was and was not)."""
    out = Path(out)
    files = result_files(out, summary)
    reports = [store_stow(server, files, out=out, progress=progress) for server in stow]
    reports += [store_scp(target, files, out=out, timeout=timeout, progress=progress) for target in scp]
    write_json(out / STORE_RECORD, {"stored_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                    "destinations": [r.as_dict() for r in reports]})
    if any(r.failed for r in reports):
        lines = "; ".join(r.line() for r in reports)
        raise StoreError(f"not every DICOM result was stored: {lines}. The local copies are in {out}/ "
                         f"({STORE_RECORD} lists what was stored where)", reports)
    return reports
