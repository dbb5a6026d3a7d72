"""One device policy for every command: ``--device auto|cpu|cuda[:N]`` and memory budgets.

* :func:`resolve_device`: a device spec to a :class:`torch.device`; ``auto`` takes the GPU where
  there is one (under ``torchrun``, this process's ``cuda:LOCAL_RANK``); an unavailable device is a
  :class:`DeviceError` that says what the machine has.
* :func:`add_device_argument`: the ``--device`` option of the commands.
* :func:`memory_budget`: bytes a chunked computation may use: a share of the GPU's free memory
  (``torch.cuda.mem_get_info``) on CUDA, a fixed CPU-sized default elsewhere.
* :func:`to_numpy`: a tensor to a NumPy array through the host (``detach().cpu()``), on any device.
* :func:`bf16_supported`: whether bf16 autocast is native on a device.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

DEVICE_HELP = "auto (the GPU where there is one), cpu, cuda or cuda:N (default auto)"

#: share of the GPU's free memory that one chunked computation (explanations, relevance) may plan for
GPU_MEMORY_SHARE = 0.4


class DeviceError(ValueError):
    """A device that is not there (no CUDA, or fewer GPUs than the index asks for)."""


def _local_rank() -> int | None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return None


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None): ``cuda`` where CUDA is available, else ``cpu``; ``cpu``; ``cuda`` / ``cuda:N``.

    Under ``torchrun`` (``WORLD_SIZE > 1``) ``auto`` and a bare ``cuda`` mean this process's
    ``cuda:LOCAL_RANK``. Raises :class:`DeviceError` for a device this machine does not have.
    """
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise DeviceError(f"--device {spec}: not a device ({DEVICE_HELP})") from err
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise DeviceError(f"--device {spec}: only cpu and cuda devices are supported ({DEVICE_HELP})")
    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise DeviceError(f"--device {spec}: CUDA is not available here (torch {torch.__version__}, {build}); "
                          "use --device cpu or auto")
    index = device.index
    if index is None:
        index = _local_rank() or 0
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"--device {spec}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


def add_device_argument(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    """``--device`` (resolved later by :func:`resolve_device`, so ``--help`` works on any machine)."""
    parser.add_argument("--device", default=default, help=DEVICE_HELP.replace("default auto", f"default {default}"))


def free_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device (``torch.cuda.mem_get_info``); None elsewhere."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def memory_budget(device: torch.device, cpu_bytes: int, share: float = GPU_MEMORY_SHARE) -> int:
    """Bytes a chunked computation on ``device`` may plan for: ``share`` of the GPU's free memory
    (at least ``cpu_bytes``) on CUDA, ``cpu_bytes`` elsewhere."""
    free = free_memory(device)
    return cpu_bytes if free is None else max(cpu_bytes, int(share * free))


def bf16_supported(device: torch.device) -> bool:
    """True where bf16 autocast runs natively: CUDA with bf16 support (Ampere and later)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """``tensor`` as a NumPy array, copied to the host first when it lives on a device."""
    return tensor.detach().cpu().numpy()
