"""This process's place in a ``torchrun`` job, and meeting points where an error on one rank ends every rank with
its message.

:class:`Process` is the rank, world size and device of this process (rank 0 of 1 when run plainly), for the
benchmark runner and training alike: :func:`current_process` joins the job's process group once (gloo on CPU,
NCCL on GPUs), :func:`process_group` for the length of one job (the group it started is ended after).

:func:`agree` replaces a bare barrier: every rank brings the error it caught since the last meeting (or
None); when any rank brings one, every rank raises it, rebuilt as the same class where that class takes
a message (``ConfigError``, ``ValueError``...), else a :class:`RankError`. Nobody waits for a rank that
has failed. Each meeting has its own timeout, sized by the caller to the work the others may still do
(a gloo group over the CPU, whatever backend the job's default group uses). Plain runs (one process)
re-raise their own error and never wait.
"""

from __future__ import annotations

import datetime
import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from lidc_cdam.device import resolve_device

#: the shortest wait at a meeting point
MIN_TIMEOUT = datetime.timedelta(minutes=10)


class RankError(RuntimeError):
    """Another rank of the job failed (its message, and which rank)."""


def world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rebuild(payload: tuple[str, str, str], rank: int) -> BaseException:
    module, name, message = payload
    try:
        cls = getattr(importlib.import_module(module), name)
        if isinstance(cls, type) and issubclass(cls, Exception):
            return cls(message)
    except Exception:  # a class that cannot be rebuilt from its message alone
        pass
    return RankError(f"rank {rank} failed: {name}: {message}")


def agree(error: BaseException | None, timeout: datetime.timedelta = MIN_TIMEOUT) -> None:
    """Meet the other ranks; raise the first error any rank brought (see the module docstring)."""
    rank, size = world()
    if size == 1:
        if error is not None:
            raise error
        return
    payload: Any = None if error is None else (type(error).__module__, type(error).__qualname__, str(error))
    group = dist.new_group(backend="gloo", timeout=max(timeout, MIN_TIMEOUT))
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, payload, group=group)
    dist.destroy_process_group(group)
    for other, item in enumerate(gathered):
        if item is None:
            continue
        if other == rank and error is not None:
            raise error
        raise _rebuild(item, other) from error


@dataclass(frozen=True)
class Process:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when run plainly) and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes what the job writes once."""
        return self.rank == 0

    def owns(self, part: int) -> bool:
        """Whether this rank does ``part`` (parts are dealt round-robin)."""
        return part % self.world == self.rank

    def barrier(self, error: BaseException | None = None, timeout: datetime.timedelta = MIN_TIMEOUT) -> None:
        """Wait for the other ranks (at most ``timeout``); any rank's ``error`` is raised on every rank
        (:func:`agree`)."""
        agree(error, timeout)


def current_process(device: str | torch.device | None = "auto") -> Process:
    """Join ``torchrun``'s process group once (gloo on CPU, NCCL on GPUs). ``device`` as
    :func:`lidc_cdam.device.resolve_device` (``auto``: this rank's GPU, ``cuda:LOCAL_RANK``, where there is one)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device)
    if world_size == 1:
        return Process(device=device)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Process(dist.get_rank(), dist.get_world_size(), device)


@contextmanager
def process_group(device: str | torch.device | None = "auto") -> Iterator[Process]:
    """:func:`current_process` for the length of one job: a process group it started is ended afterwards."""
    started = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    process = current_process(device)
    try:
        yield process
    finally:
        if started:
            dist.destroy_process_group()
