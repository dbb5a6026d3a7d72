"""Fetch a CT series from a DICOMweb server (WADO-RS) into the lidc-cdam cache, once.

The cache holds one folder per SeriesInstanceUID (``<cache>/pacs/series/<uid>/``, :func:`series_folder`), one file
per instance (``<SOPInstanceUID>.dcm``, each written atomically). When every instance the server lists (QIDO-RS) is
there, a completion marker (``COMPLETE.json``: the study, the series, the SOP Instance UIDs, the server's public
URL) is written last. A series with a marker whose files are all present is never fetched again (no request at
all); an interrupted fetch (killed, cancelled, the server gone) resumes with the missing instances only.

- :func:`fetch_steps`: a generator of ``(instances done, total)`` returning a :class:`Fetched`; closing it (or
  ``cancel``) stops the fetch, keeping what arrived;
- :func:`fetch_series`: the same with a ``progress(done, total)`` callback;
- :func:`cached_series`: the folder of a complete cached series, or None.

Without a series UID the study's largest CT series is taken (:func:`lidc_cdam.ct.pacs.find.choose_series`).
The folder is read as any DICOM folder (:func:`lidc_cdam.ct.read.read_ct`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lidc_cdam.cache import cache_dir
from lidc_cdam.ct.pacs.client import PacsError, Server, calling
from lidc_cdam.ct.pacs.find import choose_series, search_series
from lidc_cdam.io import atomic_write, write_json

MARKER = "COMPLETE.json"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")

Cancel = Callable[[], bool] | Any  # a callable returning True to stop, or a threading.Event


class FetchCancelled(PacsError):
    """The fetch was cancelled; what arrived stays in the cache and the next fetch resumes it."""


@dataclass
class Fetched:
    """A series in the cache: its folder, UIDs, instances (all / fetched now), bytes fetched now, seconds, and
    whether it came from the cache without a request to the server."""

    folder: Path
    study: str
    series: str
    instances: int
    downloaded: int
    bytes: int
    seconds: float
    from_cache: bool
    server: str = ""

    def as_source(self) -> dict[str, Any]:
        """What :func:`lidc_cdam.ct.outputs.explain_points` records as the input (``source``): where the series came
        from (the public URL, no credentials), its UIDs, the cache folder, what this fetch cost."""
        return {"series": f"{self.server} study {self.study} series {self.series}",
                "pacs": {"url": self.server, "study_instance_uid": self.study, "series_instance_uid": self.series,
                         "cache": str(self.folder), "instances": self.instances, "from_cache": self.from_cache,
                         "fetched_instances": self.downloaded, "fetched_bytes": self.bytes,
                         "fetch_seconds": round(self.seconds, 3)}}


def cache_root() -> Path:
    """``<lidc-cdam cache>/pacs/series``."""
    return cache_dir() / "pacs" / "series"


def check_uid(uid: str, what: str) -> str:
    """``uid`` if it is a DICOM UID (digits and dots, at most 64 characters); :class:`PacsError` otherwise."""
    uid = str(uid).strip()
    if not _UID.match(uid) or len(uid) > 64:
        raise PacsError(f"{what} {uid!r} is not a DICOM UID (digits and dots, e.g. 1.2.840.113619.2.55...)")
    return uid


def series_folder(series: str, root: str | Path | None = None) -> Path:
    """The cache folder of a series (not created)."""
    return Path(root if root is not None else cache_root()) / check_uid(series, "SeriesInstanceUID")


def _marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("instances"), list):
        return None
    if not all((folder / f"{uid}.dcm").is_file() for uid in data["instances"]):
        return None
    return data


def cached_series(series: str, root: str | Path | None = None) -> Path | None:
    """The folder of ``series`` when its fetch completed and every file is there, else None."""
    folder = series_folder(series, root)
    return folder if _marker(folder) is not None else None


def _stop(cancel: Cancel | None) -> bool:
    if cancel is None:
        return False
    is_set = getattr(cancel, "is_set", None)
    return bool(is_set() if is_set is not None else cancel())


def _save(ds: Any, path: Path) -> int:
    atomic_write(path, lambda tmp: ds.save_as(tmp, enforce_file_format=True))
    return path.stat().st_size


def fetch_steps(server: Server, study: str, series: str | None = None, *, root: str | Path | None = None,
                cancel: Cancel | None = None) -> Generator[tuple[int, int], None, Fetched]:
    """Fetch ``series`` of ``study`` (default: its largest CT series) into the cache, yielding ``(done, total)``
    instances; returns the :class:`Fetched` series. :class:`PacsError` when the server fails or does not have the
    study or series; :class:`FetchCancelled` when ``cancel`` says so."""
    start = time.perf_counter()
    study = check_uid(study, "StudyInstanceUID")
    where = f"{server.url}: study {study}"
    if series is None:
        found = search_series(server, study)
        if not found:
            raise PacsError(f"{where}: no such study on this server (or it has no series)")
        series = choose_series(found, where=where).uid
    series = check_uid(series, "SeriesInstanceUID")
    folder = series_folder(series, root)
    known = _marker(folder)
    if known is not None:
        n = len(known["instances"])
        yield n, n
        return Fetched(folder, study, series, n, 0, 0, time.perf_counter() - start, True, server.url)
    with calling(f"listing the instances of series {series} (QIDO-RS)", server):
        listed = server.client.search_for_instances(study, series, fields=["SOPInstanceUID"], get_remaining=True)
    uids = list(dict.fromkeys(str(item.get("00080018", {}).get("Value", [""])[0]) for item in listed))
    uids = [u for u in uids if u]
    if not uids:
        raise PacsError(f"{where}: no series {series} in this study on this server (or the study does not exist)")
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in folder.glob(".*.tmp"):  # a killed fetch's half-written file
        leftover.unlink(missing_ok=True)
    wanted = set(uids)
    missing = [u for u in uids if not (folder / f"{u}.dcm").is_file()]
    total, done, fetched, size = len(uids), len(uids) - len(missing), 0, 0
    yield done, total
    if missing:
        if len(missing) == total:  # nothing here yet: the whole series in one streamed request
            with calling(f"retrieving series {series} (WADO-RS)", server):
                stream = server.client.iter_series(study, series)
                try:
                    for ds in stream:
                        uid = str(ds.SOPInstanceUID)
                        if uid not in wanted:
                            continue
                        size += _save(ds, folder / f"{uid}.dcm")
                        done, fetched = done + 1, fetched + 1
                        yield done, total
                        if _stop(cancel):
                            raise FetchCancelled(f"{where}: fetching series {series} cancelled after {done} of "
                                                 f"{total} instances (kept in the cache; a new fetch resumes)")
                finally:
                    stream.close()
        else:  # resume: the missing instances one by one
            for uid in missing:
                if _stop(cancel):
                    raise FetchCancelled(f"{where}: fetching series {series} cancelled after {done} of {total} "
                                         "instances (kept in the cache; a new fetch resumes)")
                with calling(f"retrieving instance {uid} (WADO-RS)", server):
                    ds = server.client.retrieve_instance(study, series, uid)
                size += _save(ds, folder / f"{uid}.dcm")
                done, fetched = done + 1, fetched + 1
                yield done, total
    absent = [u for u in uids if not (folder / f"{u}.dcm").is_file()]
    if absent:
        raise PacsError(f"{where}: the server sent {total - len(absent)} of the {total} instances of series "
                        f"{series}; {len(absent)} missing (kept what arrived; a new fetch resumes)")
    for extra in folder.glob("*.dcm"):  # instances no longer on the server
        if extra.stem not in wanted:
            extra.unlink()
    write_json(folder / MARKER, {"study": study, "series": series, "server": server.url, "instances": uids})
    return Fetched(folder, study, series, total, fetched, size, time.perf_counter() - start, False, server.url)


def fetch_series(server: Server, study: str, series: str | None = None, *, root: str | Path | None = None,
                 progress: Callable[[int, int], None] | None = None, cancel: Cancel | None = None) -> Fetched:
    """:func:`fetch_steps` run to its end, calling ``progress(done, total)`` after each instance."""
    steps = fetch_steps(server, study, series, root=root, cancel=cancel)
    while True:
        try:
            done, total = next(steps)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(done, total)
