"""Find studies and their series on a DICOMweb server (QIDO-RS).

- :func:`search_studies` / :func:`search_series`: one QIDO-RS query each, as :class:`StudyHit` / :class:`SeriesHit`
  (UIDs, patient, date, accession, descriptions, number of series and slices);
- :func:`find_studies`: a generator of studies, each with its series, for a table that fills as answers come
  (``lidc-cdam pacs find`` and a viewer's search);
- :func:`choose_series`: a series of a study by UID, else the largest CT series (as
  :func:`lidc_cdam.ct.series.choose_series` chooses in a folder);
- :func:`format_table`: studies and series as readable text.

Failures (server down, 401, 403...) are :class:`~lidc_cdam.ct.pacs.client.PacsError`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lidc_cdam.ct.pacs.client import PacsError, Server, calling

STUDY_FIELDS = ("StudyInstanceUID", "StudyDate", "StudyDescription", "PatientID", "PatientName", "AccessionNumber",
                "ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
SERIES_FIELDS = ("SeriesInstanceUID", "Modality", "SeriesDescription", "SeriesNumber", "SeriesDate",
                 "NumberOfSeriesRelatedInstances")
_DATE = re.compile(r"^(\d{8})?(-(\d{8})?)?$")


@dataclass
class SeriesHit:
    """A series found: UID, modality, description, number, slices (instances) and date (``YYYYMMDD`` or "")."""

    uid: str
    modality: str = ""
    description: str = ""
    number: int | None = None
    n_instances: int | None = None
    date: str = ""


@dataclass
class StudyHit:
    """A study found, with its series once :func:`search_series` (or :func:`find_studies`) filled them."""

    uid: str
    patient_id: str = ""
    patient_name: str = ""
    date: str = ""
    accession: str = ""
    description: str = ""
    modalities: list[str] = field(default_factory=list)
    n_series: int | None = None
    n_instances: int | None = None
    series: list[SeriesHit] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _values(item: dict[str, Any], keyword: str) -> list[Any]:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    entry = item.get(f"{tag:08X}") if tag is not None else None
    values = (entry or {}).get("Value") or []
    return [v.get("Alphabetic", "") if isinstance(v, dict) else v for v in values]


def _text(item: dict[str, Any], keyword: str) -> str:
    values = _values(item, keyword)
    return str(values[0]).strip() if values else ""


def _int(item: dict[str, Any], keyword: str) -> int | None:
    text = _text(item, keyword)
    try:
        return int(float(text)) if text else None
    except ValueError:
        return None


def check_date_range(value: str) -> str:
    """A DICOM date or range (``YYYYMMDD``, ``YYYYMMDD-YYYYMMDD``, ``-YYYYMMDD``, ``YYYYMMDD-``; dashes inside
    dates, ``2024-01-31``, are accepted for single dates); :class:`PacsError` otherwise."""
    text = value.strip()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        text = text.replace("-", "")
    if not text or text == "-" or not _DATE.match(text):
        raise PacsError(f"--study-date {value!r}: expected YYYYMMDD or a range YYYYMMDD-YYYYMMDD (either end may be "
                        "left open)")
    return text


def study_hit(item: dict[str, Any]) -> StudyHit:
    """A :class:`StudyHit` from a QIDO-RS study result (DICOM JSON)."""
    return StudyHit(uid=_text(item, "StudyInstanceUID"), patient_id=_text(item, "PatientID"),
                    patient_name=_text(item, "PatientName"), date=_text(item, "StudyDate"),
                    accession=_text(item, "AccessionNumber"), description=_text(item, "StudyDescription"),
                    modalities=[str(v) for v in _values(item, "ModalitiesInStudy")],
                    n_series=_int(item, "NumberOfStudyRelatedSeries"),
                    n_instances=_int(item, "NumberOfStudyRelatedInstances"))


def series_hit(item: dict[str, Any]) -> SeriesHit:
    """A :class:`SeriesHit` from a QIDO-RS series result (DICOM JSON)."""
    return SeriesHit(uid=_text(item, "SeriesInstanceUID"), modality=_text(item, "Modality"),
                     description=_text(item, "SeriesDescription"), number=_int(item, "SeriesNumber"),
                     n_instances=_int(item, "NumberOfSeriesRelatedInstances"), date=_text(item, "SeriesDate"))


def search_studies(server: Server, *, patient: str | None = None, accession: str | None = None,
                   study_date: str | None = None, modality: str | None = None, study: str | None = None,
                   limit: int | None = 200) -> list[StudyHit]:
    """Studies matching every filter given (``patient``: PatientID, wildcards ``*`` ``?`` allowed; ``study_date``:
    see :func:`check_date_range`; ``modality``: one of the study's modalities, e.g. ``CT``)."""
    filters: dict[str, Any] = {}
    if patient:
        filters["PatientID"] = patient
    if accession:
        filters["AccessionNumber"] = accession
    if study_date:
        filters["StudyDate"] = check_date_range(study_date)
    if modality:
        filters["ModalitiesInStudy"] = modality.upper()
    if study:
        filters["StudyInstanceUID"] = study
    with calling("finding studies (QIDO-RS)", server):
        found = server.client.search_for_studies(fields=list(STUDY_FIELDS), search_filters=filters, limit=limit)
    hits = [study_hit(item) for item in found]
    return sorted(hits, key=lambda s: (s.date, s.patient_id, s.uid), reverse=True)


def search_series(server: Server, study: str, modality: str | None = None) -> list[SeriesHit]:
    """The series of ``study`` (of one ``modality`` if given), by series number."""
    filters = {"Modality": modality.upper()} if modality else None
    with calling(f"listing the series of study {study} (QIDO-RS)", server):
        found = server.client.search_for_series(study, fields=list(SERIES_FIELDS), search_filters=filters)
    hits = [series_hit(item) for item in found]
    return sorted(hits, key=lambda s: (s.number if s.number is not None else 1 << 30, s.uid))


def find_studies(server: Server, *, with_series: bool = True, **filters: Any) -> Iterator[StudyHit]:
    """Studies matching ``filters`` (:func:`search_studies`), each with its series listed, one at a time."""
    for hit in search_studies(server, **filters):
        if with_series:
            hit.series = search_series(server, hit.uid)
        yield hit


def choose_series(series: Sequence[SeriesHit], uid: str | None = None, where: str = "") -> SeriesHit:
    """``uid`` among ``series``, else the CT series with the most instances; :class:`PacsError` when there is no
    such series."""
    listing = "; ".join(f"{s.modality or '?'} {s.description or '(no description)'} ({s.n_instances} slices) "
                        f"{s.uid}" for s in series[:8]) or "no series"
    if uid:
        for s in series:
            if s.uid == uid.strip():
                return s
        raise PacsError(f"{where}: no series {uid} in this study ({listing})")
    ct = [s for s in series if s.modality.upper() == "CT"]
    if not ct:
        raise PacsError(f"{where}: no CT series in this study ({listing})")
    return max(ct, key=lambda s: s.n_instances or 0)


def _date(text: str) -> str:
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) == 8 and text.isdigit() else text or "-"


def format_table(studies: Sequence[StudyHit]) -> str:
    """Studies and their series as text: a line per study, then its series as indented columns."""
    if not studies:
        return "no studies found"
    lines = []
    for n, s in enumerate(studies, 1):
        patient = s.patient_id + (f" ({s.patient_name})" if s.patient_name and s.patient_name != s.patient_id else "")
        lines.append(f"study {n}  {_date(s.date)}  patient {patient or '-'}  accession {s.accession or '-'}  "
                     f"{s.description or '(no description)'}")
        lines.append(f"  StudyInstanceUID {s.uid}")
        if s.series:
            lines.append(f"  {'modality':<8}  {'slices':>6}  {'date':<10}  {'description':<32}  SeriesInstanceUID")
            for x in s.series:
                slices = "?" if x.n_instances is None else str(x.n_instances)
                lines.append(f"  {x.modality or '?':<8}  {slices:>6}  {_date(x.date):<10}  "
                             f"{(x.description or '-')[:32]:<32}  {x.uid}")
    return "\n".join(lines)
