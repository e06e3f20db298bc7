"""Keep the ranks in step where only some of them do the work: rank 0 first, errors shared with every rank.

A user error (a bad model path, a missing Hub ID, a bad row, an ``output_dir``
under a regular file) that only rank 0 meets would otherwise leave the other
ranks waiting in a collective until rank 0's exit breaks it, and they would
report "lost contact with another rank" (exit 4) instead of the error (exit 2).
Here the error travels to every rank as a value, and every rank raises it: the
job exits 2 whichever rank the launcher sees end first, and only rank 0 prints
it (``train.main``).

- :func:`on_rank_zero`: work that only rank 0 does (checking ``output_dir``);
  its result is sent to the others.
- :func:`leaders_first`: work that fills a cache (a download, tokenization):
  global rank 0 first, then each other node's local rank 0 (a no-op when the
  nodes share the cache), then every other rank, which finds the cache warm.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _portable(exc: BaseException) -> BaseException:
    """``exc`` itself when it pickles, else a RuntimeError with its text (it must travel to the other ranks)."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _raise_any(failure: BaseException | None) -> None:
    """Collective: every rank raises the first rank's failure, if any rank has one."""
    failures: list = [None] * _world()
    dist.all_gather_object(failures, None if failure is None else _portable(failure))
    first = next((f for f in failures if f is not None), None)
    if first is not None:
        raise first


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
    dist.all_gather_object(gathered, (result, None if failure is None else _portable(failure)))
    result, failed = gathered[0]
    if failed is not None:
        raise failed
    return result


def leaders_first(work: Callable[[], T]) -> T:
    """``work()`` on global rank 0, then on each other node's local rank 0, then on the remaining ranks.

    Collective. Any exception of a leader is raised on every rank, so no rank is
    left waiting at a barrier.
    """
    if _world() == 1:
        return work()
    rank = dist.get_rank()
    local = int(os.environ.get("LOCAL_RANK", rank))
    result, done = None, False
    for my_turn in (rank == 0, local == 0 and rank != 0):
        failure = None
        if my_turn:
            try:
                result, done = work(), True
            except Exception as exc:  # every rank must hear of it, or the others wait forever
                failure = exc
        _raise_any(failure)
    return result if done else work()
