"""Keep the ranks in step when only one of them can fail: share rank 0's outcome, or any rank's error.

A user error (a bad model path, an ``output_dir`` under a regular file) that only
rank 0 meets would otherwise leave the other ranks waiting in a collective until
rank 0's exit breaks it, and they would report "lost contact with another rank"
(exit 4) instead of the error (exit 2). Here the error travels to every rank as a
value, and every rank raises it: the job exits 2 whichever rank the launcher sees
end first, and only rank 0 prints it (``train.main``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def on_rank_zero(fn: Callable[[], T], errors: tuple[type[BaseException], ...]) -> T:
    """Run ``fn`` on rank 0 only and return its result on every rank (it must pickle). Collective.

    An exception of one of ``errors`` raised by ``fn`` is raised on every rank, with
    the same class and message.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    result, failure = None, None
    if rank == 0:
        try:
            result = fn()
        except errors as exc:
            failure = exc
    if _world() == 1:
        if failure is not None:
            raise failure
        return result
    gathered: list = [None] * _world()
    dist.all_gather_object(gathered, (result, None if failure is None else (type(failure), str(failure))))
    result, failed = gathered[0]
    if failed is not None:
        cls, message = failed
        raise cls(message) from None
    return result
