"""How much of the sphericity rating could a reader of the central slice's outline explain? For issue 22.

For every phantom of a ``lidc-cdam phantoms`` folder, the in-plane axis ratio (square root of the second
moments' eigenvalue ratio) of the central axial slice of:

- ``body``: the rendered mask without its spikes (the sphericity cause alone);
- ``mask``: the whole mask, spikes included;
- ``image``: the image's connected nodule above -600 HU at the centre, what a threshold segments (above the
  haze of a subtle nodule, -450 HU at most; a ground-glass nodule, -700 HU, has none and is left out);

and the R^2 of a linear fit of the rating on its log (squared correlation), over the nodules where all three
are defined and those of 8 mm or more. A model of the central slice reading the outline alone is capped near
these figures. For comparison, what the whole volume holds: ``body_3d``, the R^2 of a least-squares fit of the
rating on the logs of the 3D body's two second-moment axis ratios (long / short, long / middle) and the central
slice's axis ratio, a reading a model of the central slice cannot make.

    python benchmarks/cause_oracle.py ph4 ph5
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from scipy import ndimage

from lidc_cdam.data.lidc.model_input import CENTRE

READINGS = ("body", "mask", "image")
VOLUME_READINGS = ("body_3d_long_short", "body_3d_long_middle")
THRESHOLD_HU = -600.0


def axis_ratio(inside: np.ndarray) -> float:
    """Long / short axis of a 2D region's second moments (NaN when under 3 pixels)."""
    yx = np.argwhere(inside)
    if len(yx) < 3:
        return float("nan")
    eig = np.linalg.eigvalsh(np.cov(yx.T))
    return float(np.sqrt(eig[1] / max(eig[0], 1e-6)))


def axis_ratios_3d(inside: np.ndarray) -> tuple[float, float]:
    """Long / short and long / middle axis of a 3D region's second moments (NaN when under 4 voxels)."""
    zyx = np.argwhere(inside)
    if len(zyx) < 4:
        return float("nan"), float("nan")
    eig = np.linalg.eigvalsh(np.cov(zyx.T))
    return float(np.sqrt(eig[2] / max(eig[0], 1e-6))), float(np.sqrt(eig[2] / max(eig[1], 1e-6)))


def readings(root: str) -> pd.DataFrame:
    table = pd.read_csv(f"{root}/nodules.csv")
    rows = []
    for rel in table["crop_path"]:
        with np.load(f"{root}/{rel}") as crop:
            volume_body = crop["mask"].astype(bool) & ~crop["cause_spiculation"].astype(bool)
            mask = crop["mask"][CENTRE].astype(bool)
            spikes = crop["cause_spiculation"][CENTRE].astype(bool)
            bright = crop["image"][CENTRE] > THRESHOLD_HU
        labels, _ = ndimage.label(bright)
        centre = labels[labels.shape[0] // 2, labels.shape[1] // 2]
        rows.append({"body": axis_ratio(mask & ~spikes), "mask": axis_ratio(mask),
                     "image": axis_ratio(labels == centre) if centre else float("nan"),
                     **dict(zip(VOLUME_READINGS, axis_ratios_3d(volume_body), strict=True))})
    return pd.concat([table[["sphericity", "diameter_mm"]].reset_index(drop=True), pd.DataFrame(rows)], axis=1)


def r_squared(frame: pd.DataFrame, reading: str) -> float:
    ok = frame[reading].notna()
    return float(np.corrcoef(np.log(frame.loc[ok, reading].clip(1, 20)), frame.loc[ok, "sphericity"])[0, 1] ** 2)


def r_squared_of_fit(frame: pd.DataFrame, readings: tuple[str, ...]) -> float:
    """R^2 of the least-squares fit of the rating on the logs of several readings (with an intercept)."""
    x = np.c_[np.ones(len(frame)), np.log(frame[list(readings)].clip(1, 20).to_numpy())]
    y = frame["sphericity"].to_numpy(dtype=float)
    residual = y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
    return float(1 - (residual ** 2).sum() / ((y - y.mean()) ** 2).sum())


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="lidc-cdam phantoms folders")
    args = parser.parse_args(argv)
    result = {}
    for root in args.folders:
        frame = readings(root).dropna()
        large = frame[frame["diameter_mm"] >= 8]
        result[root] = {f"{r}{suffix}": r_squared(part, r) for r in READINGS
                        for suffix, part in (("", frame), ("_8mm_up", large))}
        for suffix, part in (("", frame), ("_8mm_up", large)):
            result[root][f"body_3d{suffix}"] = r_squared_of_fit(part, (*VOLUME_READINGS, "body"))
        print(f"{root} ({len(frame)} nodules): R^2 of the sphericity rating on the central slice's log axis ratio "
              "(body_3d: with the 3D body's two axis ratios): "
              + ", ".join(f"{r} {result[root][r]:.2f} ({result[root][r + '_8mm_up']:.2f} from 8 mm)"
                          for r in (*READINGS, "body_3d")))
    return result


if __name__ == "__main__":
    main()
