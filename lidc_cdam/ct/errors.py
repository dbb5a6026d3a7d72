"""The error of the CT tooling: bad input reported as a clear message (the viewer shows it in its status line)."""

from __future__ import annotations

from lidc_cdam.data.lidc.errors import LidcError


class CTError(LidcError):
    """Bad input for the CT tooling (no DICOM in a folder, a checkpoint for another task...): a clear message."""


class SeriesRefused(CTError):
    """A scan that is read but refused (MR, a localizer, gantry tilt, too few slices, uneven spacing...).

    The message names the folder or file and the problem; ``reason`` is a short code (``not_ct``, ``localizer``,
    ``gantry_tilt``, ``non_orthogonal``, ``too_few_slices``, ``uneven_spacing``, ``mixed_series``,
    ``undecodable``, ``not_3d``, ``no_such_series``, ``bad_geometry`` (a spacing <= 0 or not finite, a NaN or
    infinite origin or direction), ``bad_rescale`` (a rescale slope <= 0 or not finite, a non-finite intercept)).
    """

    def __init__(self, where: object, reason: str, detail: str):
        super().__init__(f"{where}: {detail}")
        self.where = str(where)
        self.reason = reason
        self.detail = detail
