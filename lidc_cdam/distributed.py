"""Meeting points of ``torchrun`` jobs where an error on one rank ends every rank with its message.

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
from typing import Any

import torch.distributed as dist

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
