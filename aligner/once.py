"""Work that one process per node does first while the others wait: downloads, tokenization.

Global rank 0 runs the work; then, on every other node, local rank 0 runs it
(a no-op when the nodes share the cache it filled); then everyone else runs it
and finds the cache warm. An error on a leader (a missing model, a bad row) is
raised on every rank, so no rank is left waiting at a barrier.
"""

from __future__ import annotations

import os
import pickle
from typing import Callable, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def _portable(exc: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # an exception that does not pickle travels as its text
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def leaders_first(work: Callable[[], T]) -> T:
    """``work()`` on global rank 0, then on each other node's local rank 0, then on the remaining ranks."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return work()
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    result, done = None, False
    for my_turn in (rank == 0, local == 0 and rank != 0):
        error = None
        if my_turn:
            try:
                result, done = work(), True
            except Exception as exc:  # every rank must hear of it, or the others wait forever
                error = _portable(exc)
        errors: list = [None] * world
        dist.all_gather_object(errors, error)
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
    return result if done else work()
