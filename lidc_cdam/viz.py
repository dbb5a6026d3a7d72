"""The paper's look: diverging maps centred on zero, orange positive, blue negative, symmetric limits.

Matplotlib is imported inside the functions (no GUI backend chosen at import time).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure

#: blue (counter-evidence) -> white (0) -> orange (evidence)
CDAM_COLORS = ("#08306b", "#2f7fc1", "#ffffff", "#f59a23", "#a63603")


def cdam_cmap() -> Colormap:
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list("cdam", CDAM_COLORS)


def symmetric_limit(values: np.ndarray | torch.Tensor) -> float:
    """``max |v|`` (1 where the map is all zero), so that 0 sits at the colormap's centre."""
    arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    lim = float(np.nanmax(np.abs(arr))) if arr.size else 0.0
    return lim if lim > 0 else 1.0


def to_display(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised ``[C, H, W]`` model input back to an ``[H, W, 3]`` array in [0, 1]."""
    img = image.detach().cpu().float() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    img = img.clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def _upsample(map2d: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest upsampling of a patch map to the image (the authors' choice)."""
    ry, rx = shape[0] // map2d.shape[0], shape[1] // map2d.shape[1]
    if ry * map2d.shape[0] == shape[0] and rx * map2d.shape[1] == shape[1]:
        return np.kron(map2d, np.ones((ry, rx)))
    ys = (np.arange(shape[0]) * map2d.shape[0] // shape[0]).clip(0, map2d.shape[0] - 1)
    xs = (np.arange(shape[1]) * map2d.shape[1] // shape[1]).clip(0, map2d.shape[1] - 1)
    return map2d[np.ix_(ys, xs)]


def plot_explanation_grid(
    image: np.ndarray,
    rows: Sequence[tuple[str, Sequence[tuple[str, np.ndarray, bool]]]],
    *,
    title: str | None = None,
    underlay: float = 0.25,
    panel_size: float = 2.2,
) -> Figure:
    """A grid of maps beside the image.

    ``rows``: ``(row label, [(column title, map [h, w], signed), ...])``. Signed maps use the
    diverging CDAM colormap with symmetric limits; unsigned ones (attention) a sequential map.
    Each map is scaled on its own (as in the paper) and drawn over a faint copy of the image.
    """
    import matplotlib.pyplot as plt

    n_cols = 1 + max(len(cols) for _, cols in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(panel_size * n_cols, panel_size * len(rows) + 0.4),
                             squeeze=False)
    gray = image.mean(axis=2)
    cmap = cdam_cmap()
    for r, (label, cols) in enumerate(rows):
        axes[r, 0].imshow(image)
        axes[r, 0].set_ylabel(label, fontsize=9)
        if r == 0:
            axes[r, 0].set_title("image", fontsize=9)
        for c, (col_title, map2d, signed) in enumerate(cols, start=1):
            ax = axes[r, c]
            full = _upsample(np.asarray(map2d, dtype=float), image.shape[:2])
            ax.imshow(gray, cmap="gray", alpha=underlay)
            if signed:
                lim = symmetric_limit(full)
                im = ax.imshow(full, cmap=cmap, vmin=-lim, vmax=lim, alpha=1 - underlay)
            else:
                im = ax.imshow(full, cmap="inferno", alpha=1 - underlay)
            ax.set_title(col_title, fontsize=9)
            cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
            cb.ax.tick_params(labelsize=6)
        for c in range(1 + len(cols), n_cols):
            axes[r, c].axis("off")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Save atomically (temp file + rename) and close the figure."""
    import os

    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
    return path
