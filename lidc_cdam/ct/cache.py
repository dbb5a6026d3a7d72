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
from typing import Any

import numpy as np

from lidc_cdam.ct.checkpoint import LoadedModel, file_fingerprint, load_checked_model
from lidc_cdam.ct.maps import MapRequest, MapResult, compute_steps, crop_steps, drain
from lidc_cdam.io import write_npz

CACHE_VERSION = 2  # 2: per-slice predictions and the central latent


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

    @staticmethod
    def crop_key(loaded: LoadedModel, crop: dict[str, Any], targets: tuple[str, ...], method: str, view: str,
                 slices: str, margin: int, options: dict[str, Any] | None) -> str:
        """The key of a crop in memory explained by a loaded model (its contents, not a file path)."""
        parts = {"checkpoint": loaded.fingerprint, "crop": crop_digest(crop),
                 "targets": [target_key(t) for t in targets],
                 "method": method, "view": view, "slices": slices, "margin": margin,
                 "options": dict(sorted((options or {}).items())), "version": CACHE_VERSION}
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def get(self, request: MapRequest | str) -> MapResult | None:
        """The cached result of a request (or of a key from :meth:`crop_key`), None on a miss."""
        key = request if isinstance(request, str) else self.key(request)
        with self._lock:
            if key in self._mem:
                self._mem.move_to_end(key)
                return self._mem[key]
        if self.folder is not None and (self.folder / f"{key}.npz").is_file():
            try:
                with np.load(self.folder / f"{key}.npz", allow_pickle=False) as data:
                    info = json.loads(str(data["info"]))
                    latent = data["central_latent"] if "central_latent" in data.files else None
                    features = ({int(k): v for k, v in zip(data["trust_slices"], data["trust_features"], strict=True)}
                                if "trust_features" in data.files else None)
                    result = MapResult(data["maps"], **info, central_latent=latent, trust_features=features)
            except (OSError, ValueError, KeyError, TypeError):
                return None
            self._remember(key, result)
            return result
        return None

    def put(self, request: MapRequest | str, result: MapResult) -> None:
        key = request if isinstance(request, str) else self.key(request)
        self._remember(key, result)
        if self.folder is not None:
            info = {k: v for k, v in result.__dict__.items()
                    if k not in ("maps", "cached", "central_latent", "trust_features")}
            arrays = {} if result.central_latent is None else {"central_latent": result.central_latent}
            if result.trust_features:
                arrays["trust_slices"] = np.array(sorted(result.trust_features), dtype=np.int64)
                arrays["trust_features"] = np.stack([result.trust_features[k] for k in sorted(result.trust_features)])
            write_npz(self.folder / f"{key}.npz", maps=result.maps.astype(np.float32),
                      info=np.array(json.dumps(info)), **arrays)

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


def target_key(target: Any) -> str:
    """An output by its name; a concept by its name, similarity and the hash of its vector (two folds' concepts of
    one name differ)."""
    if isinstance(target, str):
        return target
    vector = np.ascontiguousarray(target.vector.detach().cpu().double().numpy())
    return f"concept:{target.name}:{target.similarity}:{hashlib.sha256(vector.tobytes()).hexdigest()[:16]}"


def crop_digest(crop: dict[str, Any]) -> str:
    """A content hash of a crop record: its HU, mask and placement (``crop_to_world``)."""
    h = hashlib.sha256()
    for name in ("image", "mask", "crop_to_world"):
        value = crop.get(name)
        if value is not None:
            arr = np.ascontiguousarray(value)
            h.update(f"{name}{arr.dtype}{arr.shape}".encode())
            h.update(arr.tobytes())
    return h.hexdigest()


def cached_crop_steps(loaded: LoadedModel, crop: dict[str, Any], targets: tuple[str, ...], method: str = "cdam",
                      view: str = "axial", slices: str = "nodule", margin: int = 3,
                      options: dict[str, Any] | None = None, batch: int = 8, where: object = "crop",
                      cache: MapCache | None = None) -> Generator[tuple[int, int], None, MapResult]:
    """:func:`lidc_cdam.ct.maps.crop_steps` through ``cache`` (a hit is returned at once, ``cached=True``)."""
    key = None
    if cache is not None:
        start = time.perf_counter()
        key = cache.crop_key(loaded, crop, tuple(targets), method, view, slices, margin, options)
        hit = cache.get(key)
        if hit is not None:
            return MapResult(**{**hit.__dict__, "cached": True, "seconds": time.perf_counter() - start})
    result = yield from crop_steps(loaded, crop, targets, method, view, slices, margin, options, batch, where)
    if cache is not None and key is not None:
        cache.put(key, result)
    return result


def cached_compute(request: MapRequest, cache: MapCache | None,
                   progress: Callable[[int, int], None] | None = None) -> MapResult:
    """:func:`compute_maps` through ``cache`` (a hit is returned with ``cached=True``)."""
    return drain(cached_steps(request, cache), progress)
