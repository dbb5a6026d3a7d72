"""The error of the CT tooling: bad input reported as a clear message (the viewer shows it in its status line)."""

from __future__ import annotations

from lidc_cdam.data.lidc.errors import LidcError


class CTError(LidcError):
    """Bad input for the CT tooling (no DICOM in a folder, a checkpoint for another task...): a clear message."""
