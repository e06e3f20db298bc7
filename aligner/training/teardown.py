"""The end of a run, in one order for every exit path: close what runs threads, then leave the process group together.

A process that reaches interpreter exit with the process group still alive leaves
its destruction to static destructors, which run while gloo's (or NCCL's) worker
threads and the c10d store's thread may still be joinable; C++ then aborts with
``terminate called without an active exception`` (seen under load, one run in a
few; the same message from a gloo group left to exit is pytorch/pytorch#190489, and
pytorch/pytorch#179291 describes gloo's worker threads still holding work at
interpreter finalization). Error exits hit it too (1 run in 9 of a refused data
mixture exited 250, SIGABRT through DeepSpeed's launcher) when each rank left the
group alone. So every run ends explicitly, whatever its exit code, in this order:

1. closers registered by the run (the progress bar, the TensorBoard writer, whose
   thread flushes and joins on close, the launcher watcher), newest first;
2. a rendezvous of every rank through the c10d store (not a collective: a rank that
   is elsewhere, e.g. still in a collective after a fault, cannot be mismatched with
   it), bounded by :data:`WAIT_S` (at most ``train.dist_timeout_s``) so that a dead
   peer costs a bounded wait, not a hang; then the closers that must outlive every
   rank's work (the job lock, aligner/training/joblock.py);
3. ``torch.distributed.destroy_process_group()`` on every rank, rank 0 last: rank 0
   hosts the store, so it waits (bounded) until the others have left before it
   destroys the group and exits.

The clean and the error paths differ only in whether every rank arrives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch.distributed as dist

log = logging.getLogger("aligner")
_closers: list[Callable[[], None]] = []
_after_ranks: list[Callable[[], None]] = []
#: How long a rank waits at the end for the others to reach the end too (and rank 0 for them to leave).
WAIT_S = 30.0
#: A rank says once that it is waiting, after this long.
SAY_AFTER_S = 5.0
ARRIVED, LEFT = "aligner/teardown/arrived", "aligner/teardown/left"


def register(closer: Callable[[], None], after_ranks: bool = False) -> None:
    """Call ``closer`` at :func:`shutdown` (newest first); ``after_ranks``: once every rank reached the end (or the
    wait for them ended), e.g. the job lock, which must outlive every rank's writes."""
    (_after_ranks if after_ranks else _closers).append(closer)


def close_all(closers: list[Callable[[], None]] = _closers) -> None:
    """Run the registered closers (newest first); a failing close is logged, never raised."""
    while closers:
        closer = closers.pop()
        try:
            closer()
        except Exception as exc:  # a failing close must not hide the run's own outcome
            log.warning("while closing %s: %s", getattr(closer, "__qualname__", closer), exc)


def _wait_for(store, key: str, count: int, deadline: float, rank: int, what: str) -> bool:
    """Poll ``key`` (a counter in the store) until it reaches ``count``; False at ``deadline`` or if the store is gone."""
    said, started = False, time.monotonic()
    while True:
        if int(store.add(key, 0)) >= count:
            return True
        now = time.monotonic()
        if now >= deadline:
            return False
        if not said and now - started >= SAY_AFTER_S:
            log.warning("rank %d: waiting up to %.0f s more for the other ranks %s", rank, deadline - now, what)
            said = True
        time.sleep(0.05)


def shutdown(wait_s: float = WAIT_S) -> None:
    """Close what the run opened, then leave the process group with every rank (see the module docstring)."""
    close_all()
    if not dist.is_initialized():
        close_all(_after_ranks)
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    store = dist.distributed_c10d._get_default_store() if world > 1 else None  # kept: destroy drops the group's own
    everyone = True
    if store is not None:
        try:
            store.add(ARRIVED, 1)
            everyone = _wait_for(store, ARRIVED, world, time.monotonic() + wait_s, rank, "to finish")
        except Exception as exc:  # the store's host (rank 0) is gone: nobody is left to wait for
            everyone = False
            log.debug("teardown rendezvous: %s", exc)
    if not everyone:
        log.warning("rank %d: not every rank reached the end of the run; leaving the process group alone", rank)
    close_all(_after_ranks)
    try:
        if store is not None and rank == 0 and everyone:
            _wait_for(store, LEFT, world - 1, time.monotonic() + wait_s, rank, "to leave the process group")
        dist.destroy_process_group()
        if store is not None and rank != 0:
            store.add(LEFT, 1)
    except Exception as exc:  # a peer died after its work was done: nothing is left to save
        log.warning("leaving the process group: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
