"""A PACS from the CT path, with no Qt: find a study (QIDO-RS), fetch a series into the cache (WADO-RS), store the
DICOM results back (STOW-RS or DIMSE C-STORE). See ``docs/method.md``, "PACS".

- :mod:`.client` - :func:`connect` a DICOMweb server (credentials from the environment or netrc, never printed;
  TLS verified unless asked), :class:`PacsError`;
- :mod:`.find` - :func:`find_studies`, :func:`search_series`, :func:`choose_series`, :func:`format_table`;
- :mod:`.fetch` - :func:`fetch_series` / :func:`fetch_steps` (progress, cancel, resumable, cached by
  SeriesInstanceUID);
- :mod:`.store` - :func:`send_results`, :func:`store_stow`, :func:`store_scp`, :class:`StoreError`.
"""

from lidc_cdam.ct.pacs.client import PacsError, Server, connect, public_url
from lidc_cdam.ct.pacs.fetch import FetchCancelled, Fetched, cached_series, fetch_series, fetch_steps
from lidc_cdam.ct.pacs.find import SeriesHit, StudyHit, choose_series, find_studies, format_table, search_series
from lidc_cdam.ct.pacs.store import StoreError, StoreReport, send_results, store_scp, store_stow

__all__ = ["FetchCancelled", "Fetched", "PacsError", "SeriesHit", "Server", "StoreError", "StoreReport", "StudyHit",
           "cached_series", "choose_series", "connect", "fetch_series", "fetch_steps", "find_studies",
           "format_table", "public_url", "search_series", "send_results", "store_scp", "store_stow"]
