"""The end of a run, in one order: close what runs threads, then leave the process group together.

A process that reaches interpreter exit with the process group still alive leaves
its destruction to static destructors, which run while gloo's (or NCCL's) worker
threads and the c10d store's thread may still be joinable; C++ then aborts with
``terminate called without an active exception`` (seen under load, one run in a
few; the same message from a gloo group left to exit is pytorch/pytorch#190489, and
pytorch/pytorch#179291 describes gloo's worker threads still holding work at
interpreter finalization). So the run ends explicitly, in this order:

1. closers registered by the run (the progress bar, the TensorBoard writer, whose
   thread flushes and joins on close, the launcher watcher), newest first;
2. a barrier, so no rank tears the group down while another still talks to it;
3. ``torch.distributed.destroy_process_group()``.

After an error the peers may be gone or elsewhere, so step 2 is skipped (a
barrier could only hang or fail) and the group is destroyed locally.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch.distributed as dist

log = logging.getLogger("aligner")
_closers: list[Callable[[], None]] = []


def register(closer: Callable[[], None]) -> None:
    """Call ``closer`` at :func:`shutdown` (newest first)."""
    _closers.append(closer)


def shutdown(clean: bool) -> None:
    """Close what the run opened; ``clean``: every rank got here without an error (barrier first)."""
    while _closers:
        closer = _closers.pop()
        try:
            closer()
        except Exception as exc:  # a failing close must not hide the run's own outcome
            log.warning("while closing %s: %s", getattr(closer, "__qualname__", closer), exc)
    if not dist.is_initialized():
        return
    try:
        if clean and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
    except Exception as exc:  # a peer died after its work was done: nothing is left to save
        log.warning("leaving the process group: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
