"""Computed crop maps kept in memory (LRU) and on disk, keyed by the checkpoint's and crop's contents.

:func:`cached_steps` / :func:`cached_compute` are :func:`lidc_cdam.ct.maps.compute_steps` /
:func:`~lidc_cdam.ct.maps.compute_maps` through a :class:`MapCache`: a hit comes back at once with
``cached=True``; an edited checkpoint or crop file is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator
from pathlib import Path

import numpy as np

from lidc_cdam.ct.checkpoint import file_fingerprint, load_checked_model
from lidc_cdam.ct.maps import MapRequest, MapResult, compute_steps, drain

CACHE_VERSION = 1


class MapCache:
    """Crop maps by request, in memory (LRU, ``size`` entries) and, with ``folder``, as ``.npz`` files
    keyed by the checkpoint's and crop's content hashes (so an edited file is recomputed)."""

    def __init__(self, folder: str | Path | None = None, size: int = 32):
        self.folder = Path(folder) if folder is not None else None
        self.size = size
        self._mem: OrderedDict[str, MapResult] = OrderedDict()
        self._lock = threading.Lock()

    def key(self, request: MapRequest) -> str:
        model = load_checked_model(request.checkpoint)
        parts = {**request.__dict__, "checkpoint": model.fingerprint,
                 "crop_path": file_fingerprint(request.crop_path), "batch": None, "version": CACHE_VERSION}
        if request.method not in ("smooth-cdam", "integrated-cdam"):
            parts["n"] = None
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]

    def get(self, request: MapRequest) -> MapResult | None:
        key = self.key(request)
        with self._lock:
            if key in self._mem:
                self._mem.move_to_end(key)
                return self._mem[key]
        if self.folder is not None and (self.folder / f"{key}.npz").is_file():
            try:
                with np.load(self.folder / f"{key}.npz", allow_pickle=False) as data:
                    info = json.loads(str(data["info"]))
                    result = MapResult(data["maps"], **info)
            except (OSError, ValueError, KeyError, TypeError):
                return None
            self._remember(key, result)
            return result
        return None

    def put(self, request: MapRequest, result: MapResult) -> None:
        key = self.key(request)
        self._remember(key, result)
        if self.folder is not None:
            from lidc_cdam.io import write_npz

            info = {k: v for k, v in result.__dict__.items() if k not in ("maps", "cached")}
            write_npz(self.folder / f"{key}.npz", maps=result.maps.astype(np.float32),
                      info=np.array(json.dumps(info)))

    def _remember(self, key: str, result: MapResult) -> None:
        with self._lock:
            self._mem[key] = result
            self._mem.move_to_end(key)
            while len(self._mem) > self.size:
                self._mem.popitem(last=False)


def cached_steps(request: MapRequest, cache: MapCache | None) -> Generator[tuple[int, int], None, MapResult]:
    """:func:`compute_steps` through ``cache`` (a hit is returned at once, with ``cached=True``)."""
    if cache is not None:
        start = time.perf_counter()
        hit = cache.get(request)
        if hit is not None:
            return MapResult(**{**hit.__dict__, "cached": True, "seconds": time.perf_counter() - start})
    result = yield from compute_steps(request)
    if cache is not None:
        cache.put(request, result)
    return result


def cached_compute(request: MapRequest, cache: MapCache | None,
                   progress: Callable[[int, int], None] | None = None) -> MapResult:
    """:func:`compute_maps` through ``cache`` (a hit is returned with ``cached=True``)."""
    return drain(cached_steps(request, cache), progress)
