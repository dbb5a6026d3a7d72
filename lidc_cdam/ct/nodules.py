"""The nodules of a preprocessed folder (``nodules.csv`` + ``crops/``) whose crops were cut from a given scan,
and the nodule nearest to a point in patient millimetres."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lidc_cdam.ct.crop import CROP, crop_centre_world
from lidc_cdam.ct.errors import CTError
from lidc_cdam.ct.volume import CTVolume


@dataclass(eq=False)
class NoduleRef:
    """One nodule of a preprocessed folder (``nodules.csv`` + ``crops/``) whose crop lies in a scan."""

    nodule_id: str
    crop_path: Path
    centre_world: np.ndarray  # (x, y, z) mm, the crop's centre
    row: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.nodule_id


def list_nodules(crops_dir: str | Path, volume: CTVolume | None = None) -> list[NoduleRef]:
    """Nodules of ``crops_dir`` (an output folder of ``lidc-cdam preprocess`` / ``phantoms``, or of
    :func:`~lidc_cdam.ct.synthetic.write_synthetic`) whose crops were cut from ``volume``'s grid
    (all of them when ``volume`` is None). Raises :class:`CTError` for a folder without crops."""
    import pandas as pd

    root = Path(crops_dir).expanduser()
    table = root / "nodules.csv"
    if table.is_file():
        frame = pd.read_csv(table)
        if "crop_path" not in frame.columns:
            raise CTError(f"{table}: no crop_path column (an annotations-only table?): run "
                          "`lidc-cdam preprocess --lidc-root DIR --out DIR` to make crops")
        rows = frame.to_dict("records")
    elif (root / "crops").is_dir():
        rows = [{"nodule_id": p.stem, "crop_path": f"crops/{p.name}"} for p in sorted((root / "crops").glob("*.npz"))]
    else:
        raise CTError(f"{root}: no nodules.csv and no crops/ folder: choose the output folder of "
                      "`lidc-cdam preprocess` (or `lidc-cdam phantoms`)")
    patient = (volume.meta.get("patient_id") or "") if volume is not None else ""
    out = []
    for row in rows:
        path = root / str(row["crop_path"])
        if not path.is_file():
            continue
        if patient and "patient_id" in row and str(row["patient_id"]) not in ("", "nan", patient):
            continue
        with np.load(path, allow_pickle=False) as crop:
            if volume is not None and not volume.same_grid(crop["scan_spacing"], crop["scan_origin"],
                                                           crop["scan_shape"]):
                continue
            centre = crop_centre_world({"crop_to_world": crop["crop_to_world"]})
        out.append(NoduleRef(str(row["nodule_id"]), path, centre, row))
    return out


def nodule_at(nodules: Sequence[NoduleRef], world_xyz: np.ndarray, max_mm: float = CROP / 2) -> NoduleRef | None:
    """The nodule whose crop centre is nearest to a point (within ``max_mm``), else None."""
    if not nodules:
        return None
    dist = [float(np.linalg.norm(n.centre_world - np.asarray(world_xyz, dtype=float))) for n in nodules]
    best = int(np.argmin(dist))
    return nodules[best] if dist[best] <= max_mm else None
