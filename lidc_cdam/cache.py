"""Where lidc-cdam keeps what it derives and may reuse (trained demo models...)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache folder, created on demand.

    ``$LIDC_CDAM_CACHE`` if set, else ``$XDG_CACHE_HOME/lidc-cdam``, else ``~/.cache/lidc-cdam``.
    """
    root = os.environ.get("LIDC_CDAM_CACHE")
    if root:
        path = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        path = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lidc-cdam"
    path.mkdir(parents=True, exist_ok=True)
    return path
