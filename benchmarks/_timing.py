"""Shared helpers for the benchmark scripts (run them as ``python benchmarks/<script>.py``).

* :func:`timed`: median wall time of a call; on CUDA the device is synchronised before each clock
  reading (kernels run asynchronously, so an unsynchronised clock measures only the launches).
* :class:`Stopwatch`: the same for a block of code (``with Stopwatch(device) as sw: ...; sw.seconds``).
* :func:`autocast`: ``torch.autocast`` for ``--amp bf16`` on any device, a no-op for ``--amp none``.
* :func:`environment`: torch / CUDA versions and the GPU's name, for the JSON results.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

AMP_CHOICES = ("none", "bf16")


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for the device's queued kernels (CUDA only; nothing to wait for on the CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], repeats: int, device: torch.device | str | None = None) -> float:
    """Median wall time of ``repeats`` calls after one warm-up call; ``device``: synchronise CUDA."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Stopwatch:
    """Wall time of a ``with`` block, the device synchronised on entry and exit."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:1``...; ``auto``: CUDA when available. Fails clearly without CUDA."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available (torch {torch.__version__}, "
                         f"built for CUDA {torch.version.cuda})")
    return device


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for ``amp == "bf16"``; a null context for ``"none"``."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"amp must be one of {AMP_CHOICES}, got {amp!r}")


def environment(device: torch.device | None = None) -> dict[str, Any]:
    """Versions and hardware of this run (GPU name, torch, CUDA, cuDNN)."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device) if device is not None else None,
        "gpu": None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }
    if torch.cuda.is_available():
        index = device.index if device is not None and device.type == "cuda" and device.index is not None else 0
        props = torch.cuda.get_device_properties(index)
        info["gpu"] = torch.cuda.get_device_name(index)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_count"] = torch.cuda.device_count()
    return info
