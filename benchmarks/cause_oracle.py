"""How much of the sphericity rating could a reader of the central slice's outline explain? For issue 22.

For every phantom of a ``lidc-cdam phantoms`` folder, the in-plane axis ratio (square root of the second
moments' eigenvalue ratio) of the central axial slice of:

- ``body``: the rendered mask without its spikes (the sphericity cause alone);
- ``mask``: the whole mask, spikes included;
- ``image``: the image's connected nodule above -600 HU at the centre, what a threshold segments (above the
  haze of a subtle nodule, -450 HU at most; a ground-glass nodule, -700 HU, has none and is left out);

and the R^2 of a linear fit of the rating on its log (squared correlation), over the nodules where all three
are defined and those of 8 mm or more. A model of the central slice reading the outline alone is capped near
these figures.

    python benchmarks/cause_oracle.py ph4 ph5
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from scipy import ndimage

from lidc_cdam.data.lidc.model_input import CENTRE

READINGS = ("body", "mask", "image")
THRESHOLD_HU = -600.0


def axis_ratio(inside: np.ndarray) -> float:
    """Long / short axis of a 2D region's second moments (NaN when under 3 pixels)."""
    yx = np.argwhere(inside)
    if len(yx) < 3:
        return float("nan")
    eig = np.linalg.eigvalsh(np.cov(yx.T))
    return float(np.sqrt(eig[1] / max(eig[0], 1e-6)))


def readings(root: str) -> pd.DataFrame:
    table = pd.read_csv(f"{root}/nodules.csv")
    rows = []
    for rel in table["crop_path"]:
        with np.load(f"{root}/{rel}") as crop:
            mask = crop["mask"][CENTRE].astype(bool)
            spikes = crop["cause_spiculation"][CENTRE].astype(bool)
            bright = crop["image"][CENTRE] > THRESHOLD_HU
        labels, _ = ndimage.label(bright)
        centre = labels[labels.shape[0] // 2, labels.shape[1] // 2]
        rows.append({"body": axis_ratio(mask & ~spikes), "mask": axis_ratio(mask),
                     "image": axis_ratio(labels == centre) if centre else float("nan")})
    return pd.concat([table[["sphericity", "diameter_mm"]].reset_index(drop=True), pd.DataFrame(rows)], axis=1)


def r_squared(frame: pd.DataFrame, reading: str) -> float:
    ok = frame[reading].notna()
    return float(np.corrcoef(np.log(frame.loc[ok, reading].clip(1, 20)), frame.loc[ok, "sphericity"])[0, 1] ** 2)


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
        print(f"{root} ({len(frame)} nodules): R^2 of the sphericity rating on the central slice's log axis ratio: "
              + ", ".join(f"{r} {result[root][r]:.2f} ({result[root][r + '_8mm_up']:.2f} from 8 mm)"
                          for r in READINGS))
    return result


if __name__ == "__main__":
    main()
