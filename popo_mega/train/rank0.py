"""Work only global rank 0 does (rollouts, grading, metrics, the servers' control), made safe for the
other ranks: whatever rank 0 returns or raises reaches every rank.

Without this, an exception on rank 0 between two collectives leaves every other rank waiting in the
next one (``broadcast_object_list``, the weight sync, a checkpoint) until the process-group timeout,
a multi-rank hang instead of an error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


class RankZeroError(RuntimeError):
    """Raised on every rank but 0 when rank 0's own work failed (rank 0 raises its own exception)."""


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (picklable objects; collective over the default group)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_rank0(fn: Callable[[], T], rank: int, world: int) -> T:
    """Run ``fn()`` on rank 0 and return its result on every rank. Collective when ``world`` > 1.

    If ``fn`` raised, rank 0 re-raises it after telling the others, and every other rank raises
    ``RankZeroError`` quoting it, so all ranks leave together. The result must be picklable.
    """
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - every rank must hear of it, then it is re-raised
            error = exc
    if world > 1:
        outcome = broadcast_object(("ok", result) if error is None else
                                   ("error", f"{type(error).__name__}: {error}"))
        if rank != 0:
            if outcome[0] == "error":
                raise RankZeroError(f"rank 0 failed: {outcome[1]}")
            return outcome[1]
    if error is not None:
        raise error
    return result
