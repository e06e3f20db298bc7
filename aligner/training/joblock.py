"""One job per ``output_dir``: a lock file that names its holder, refreshed while the job runs.

Two jobs on one ``output_dir`` would write the same checkpoints. That happens when a
scheduler or a wrapper relaunches with ``--resume auto`` as soon as ``deepspeed``
returns (after SIGTERM it returns at once, while its ranks go on for a few seconds
to finish the step and save), or when two users type the same path. So global
rank 0 of every job (one lock per job, however many nodes) holds
``output_dir/aligner.lock``, a JSON file::

    {"host": ..., "pid": ..., "pid_start": ..., "started": ..., "token": ..., "world_size": ...}

- It is written whole and then linked into place (``link`` fails when the target exists,
  as ``O_EXCL`` does), so of two jobs starting at once exactly one gets it.
- The heartbeat is the file's modification time: a thread touches it every
  :data:`HEARTBEAT_S` seconds while the file holds this job's ``token``. It never
  rewrites the file, so it cannot overwrite a lock another job has taken over
  (touching that one by a race only makes a live job's lock look live).
- A second job is refused (exit 2) with the holder's host, pid, start time and last
  heartbeat. ``--resume auto`` instead waits up to ``train.lock_wait_s`` for the holder
  to finish (the relaunch case), then is refused the same way.
- A lock is *stale* when its holder is gone: on the same host, its pid is not alive
  (or is another process, by its start time in ``/proc``); on any host, its heartbeat
  is older than :data:`STALE_S` (hosts' clocks are assumed to agree within that, as
  NTP keeps them). A stale lock is taken over with a warning. Takeovers are serialised by
  an exclusive ``flock`` on ``output_dir/.aligner.lock.takeover`` (the kernel drops it when
  its holder dies, so it can never go stale itself): under it the lock is read and judged
  again, and removed only while it is still the stale one; then this job links its own
  lock as any starting job does. A lock cannot change under the guard, because only a
  takeover removes another job's lock and new locks are linked only where none is.
- The lock is removed at the end of the run, whatever the exit code
  (aligner/training/teardown.py), and only by the job whose token it holds.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("aligner")
LOCK_NAME = "aligner.lock"
#: Seconds between two heartbeats of a running job.
HEARTBEAT_S = 10.0
#: A lock whose heartbeat is older than this is stale, on any host.
STALE_S = 120.0
#: How often a waiting job looks at the lock again.
POLL_S = 2.0


class LockError(RuntimeError):
    """Another job holds ``output_dir``; the message names it and what to do."""


def lock_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / LOCK_NAME


def pid_start(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot, from /proc); None when it is gone or unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22 of proc(5); fields after ')' start at field 3


def read(path: Path) -> dict[str, Any] | None:
    """The holder recorded in the lock file at ``path``; None when there is none (an unreadable file counts as a
    holder with nothing known, so it is judged by its age)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        text = ""
    try:
        holder = json.loads(text)
        holder = holder if isinstance(holder, dict) else {}
    except ValueError:  # not written by aligner (the lock is linked in whole): judged by its age alone
        holder = {}
    try:
        holder["heartbeat"] = path.stat().st_mtime  # touched by the holder's heartbeat thread
    except FileNotFoundError:
        return None
    return holder


def stale_reason(holder: dict[str, Any], now: float | None = None) -> str | None:
    """Why the job that wrote ``holder`` is gone (see the module docstring), or None while it may be alive."""
    now = time.time() if now is None else now
    pid, start = holder.get("pid"), holder.get("pid_start")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int):
        if pid_start(pid) is None:
            return f"its process {pid} on this host is gone"
        if start is not None and pid_start(pid) != start:
            return f"process {pid} on this host is another program now"
        return None  # alive here: its heartbeat may lag behind a long save, but it is running
    beat = holder.get("heartbeat")
    if not isinstance(beat, (int, float)):
        return "it records no heartbeat"
    if now - beat > STALE_S:
        return f"its last heartbeat was {now - beat:.0f} s ago (stale after {STALE_S:.0f} s)"
    return None


def describe(holder: dict[str, Any], now: float | None = None) -> str:
    """The holder in words: ``host myhost, pid 123, started 2026-12-03 12:00:00 UTC, last heartbeat 4 s ago``."""
    now = time.time() if now is None else now
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if isinstance(started, (int, float)) else "?"
    beat = holder.get("heartbeat")
    ago = f"{max(0.0, now - beat):.0f} s ago" if isinstance(beat, (int, float)) else "never"
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {when}, last heartbeat {ago}"


@dataclass
class JobLock:
    """This job's hold on ``path``; :meth:`release` gives it up (only while the file still holds ``token``)."""

    path: Path
    holder: dict[str, Any]

    def __post_init__(self) -> None:
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="aligner-lock-heartbeat", daemon=True)
        self._thread.start()

    @property
    def token(self) -> str:
        return self.holder["token"]

    def _mine(self) -> bool:
        current = read(self.path)
        return current is not None and current.get("token") == self.token

    def _beat(self) -> None:
        while not self._done.wait(HEARTBEAT_S):
            try:
                if not self._mine():
                    log.error("the job lock %s no longer names this job (another job took it over); stop one of the "
                              "two jobs", self.path)
                    return
                os.utime(self.path)
            except OSError as exc:  # a lost mount: the next beat tries again
                log.warning("could not refresh the job lock %s: %s", self.path, exc)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file (teardown); another job's lock is left alone."""
        self._done.set()
        self._thread.join(timeout=HEARTBEAT_S + 5)
        try:
            if self._mine():
                self.path.unlink()
        except OSError as exc:
            log.warning("could not remove the job lock %s: %s", self.path, exc)


def _write_exclusive(tmp: Path, holder: dict[str, Any], path: Path) -> None:
    """Write ``holder`` to ``tmp``, then link it to ``path``: atomic, and FileExistsError when ``path`` exists."""
    with tmp.open("w") as f:
        f.write(json.dumps(holder, indent=1))
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def new_holder(world_size: int) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": pid_start(os.getpid()),
            "started": time.time(), "token": uuid.uuid4().hex, "world_size": world_size}


@contextmanager
def takeover_guard(path: Path) -> Iterator[None]:
    """Hold the exclusive ``flock`` that serialises takeovers of the lock at ``path`` (one per open file, so it
    also orders threads of one process)."""
    guard = os.open(path.with_name(f".{LOCK_NAME}.takeover"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(guard, fcntl.LOCK_EX)
        yield
    finally:
        os.close(guard)  # closing the last descriptor of the open file drops the flock


def try_acquire(output_dir: str | Path, world_size: int = 1) -> tuple[JobLock | None, dict[str, Any] | None]:
    """(this job's lock, None), or (None, the live holder). A stale lock is taken over with a warning."""
    path = lock_path(output_dir)
    for _ in range(5):  # each pass either wins, meets a live holder, or saw the lock change under it
        mine = new_holder(world_size)
        try:
            _write_exclusive(path.with_name(f".{LOCK_NAME}.{mine['token']}"), mine, path)
            return JobLock(path, mine), None
        except FileExistsError:
            pass
        holder = read(path)
        if holder is None:
            continue  # released between our two looks
        if stale_reason(holder) is None:
            return None, holder
        with takeover_guard(path):
            holder = read(path)  # judged again: another job may have taken it over while this one waited
            if holder is None:
                continue
            why = stale_reason(holder)
            if why is None:
                return None, holder
            path.unlink(missing_ok=True)  # a holder judged gone by its heartbeat may yet release it
        log.warning("job lock %s: taking over from a job that is gone (%s; %s)", path, describe(holder), why)
    raise LockError(f"the job lock {path} kept changing while this job tried to take it; another job is starting on "
                    f"the same output_dir. Wait for it, or choose another output_dir")


def refusal(path: Path, holder: dict[str, Any], waited_s: float | None) -> LockError:
    waited = f" (waited {waited_s:.0f} s for it to finish, train.lock_wait_s)" if waited_s is not None else ""
    return LockError(
        f"output_dir {path.parent} is in use by another job ({describe(holder)}){waited}: two jobs would write the "
        f"same checkpoints. Wait for that job to end (or stop it), or choose another output_dir; if that job is "
        f"gone and its host cannot be reached, delete {path}"
    )


def hold(output_dir: str | Path, wait_s: float, world_size: int) -> JobLock | None:
    """Collective: global rank 0 takes the job lock of ``output_dir``, waiting up to ``wait_s`` for a live holder to
    finish; every rank gets the same outcome (rank 0 the lock, the others None), or raises the same refusal.

    Rank 0 alone reads the clock, so every rank leaves the wait at the same poll.
    """
    from aligner.distributed.lockstep import on_rank_zero

    path = lock_path(output_dir)
    mine: dict[str, Any] = {}
    started = time.monotonic()

    def attempt() -> tuple[dict[str, Any] | None, float, bool]:
        try:
            lock, holder = try_acquire(output_dir, world_size)
        except OSError as exc:
            raise LockError(f"cannot create the job lock {path}: {exc.strerror or exc}; output_dir must be a "
                            f"writable folder") from None
        if lock is not None:
            mine["lock"] = lock
        waited = time.monotonic() - started
        if holder is not None and waited < wait_s and not mine.get("said"):
            log.warning("output_dir %s is in use by another job (%s); --resume auto waits up to %.0f s "
                        "(train.lock_wait_s) for it to finish", path.parent, describe(holder), wait_s)
            mine["said"] = True
        return holder, waited, waited >= wait_s

    while True:
        holder, waited, give_up = on_rank_zero(attempt, (LockError,))
        if holder is None:
            return mine.get("lock")
        if give_up:
            raise refusal(path, holder, waited if wait_s > 0 else None)
        time.sleep(min(POLL_S, max(0.0, wait_s - waited)))
