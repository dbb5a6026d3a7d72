"""Errors of the LIDC tooling that the command line reports as a clear message (exit code 2)."""

from __future__ import annotations


class LidcError(Exception):
    """Bad input for the LIDC tooling: not an LIDC folder, no DICOM, a scan missing from the database..."""


class SeriesError(LidcError):
    """One series cannot be used (corrupt file, missing slice, uneven spacing...): that scan is skipped."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason  # a short machine-readable code, e.g. "missing_slice"
        self.detail = detail
