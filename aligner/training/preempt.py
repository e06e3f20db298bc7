"""Stop cleanly when the cluster asks: signals, a dead launcher, and wall-clock checkpoints.

SLURM (``#SBATCH --signal=USR1@120``) and Kubernetes (SIGTERM, then SIGKILL after the
grace period) warn a job before they kill it, and a user at a terminal presses Ctrl-C
(SIGINT to every process of the foreground job). Every rank handles SIGTERM, SIGUSR1
and SIGINT by setting a flag, nothing more, so a signal never interrupts a step or a
save. Once a stop is asked for, SIGINT gets the kernel's default action back: a second
Ctrl-C ends the rank at once (no traceback, no checkpoint of that step; the last
complete one is untouched, since a checkpoint is published only once whole). A
rank whose launcher died asks to stop the same way: ``PR_SET_PDEATHSIG`` makes the
kernel send it SIGTERM when its parent exits, and a watcher thread also notices
when the parent is DeepSpeed's per-node launcher and *that* launcher's parent (the
``deepspeed`` command) is gone, which no death signal reports.

Once per optimizer step, :meth:`StopWatch.decide` all-reduces (MAX) two flags:
"a stop was asked for on this rank" and "rank 0's clock says a
``train.save_every_minutes`` checkpoint is due" (only rank 0 sets the second, so
every rank follows one clock). All ranks therefore take the same decision at the
same step: save there, and stop with :data:`EXIT_PREEMPTED`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from aligner.distributed.comm import comm_device

log = logging.getLogger("aligner")
#: The exit code of a run stopped by a signal (or by its launcher's exit) after saving a checkpoint.
EXIT_PREEMPTED = 5
#: The exit code of a run stopped by Ctrl-C before its stop handling was installed, or by a second Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED = 128 + signal.SIGINT
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
DEEPSPEED_NODE_LAUNCHER = "deepspeed.launcher.launch"


class Preempted(Exception):
    """Every rank stopped at ``step`` on request and ``checkpoint`` holds that step."""

    def __init__(self, step: int, checkpoint: Path, reasons: list[str]) -> None:
        self.step, self.checkpoint, self.reasons = step, checkpoint, reasons
        super().__init__(
            f"stopped after step {step} ({'; '.join(reasons) or 'a stop request'}); checkpoint {checkpoint} is "
            f"saved. To resume, rerun the same command with --resume auto"
        )


def _say(text: str) -> None:
    """Write a line to stderr from a signal handler (``os.write``: a buffered ``print`` may be mid-write)."""
    try:
        os.write(2, f"aligner: {text}\n".encode())
    except OSError:
        pass


def parent_of(pid: int) -> int | None:
    """The parent pid of ``pid`` from /proc (None when it is gone or /proc is absent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the command name may hold spaces: fields after ')'


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class StopWatch:
    """One rank's view of "stop now?" and "save by the clock now?"; see the module docstring."""

    def __init__(self, rank: int, save_every_minutes: float = 0.0, poll_s: float = 1.0) -> None:
        self.rank, self.save_every_s, self.poll_s = rank, save_every_minutes * 60.0, poll_s
        self.reason: str | None = None
        self.last_save = time.monotonic()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def request(self, reason: str) -> None:
        """Ask every rank to stop after the current optimizer step (safe from a handler or a thread)."""
        if self.reason is None:
            self.reason = f"rank {self.rank}: {reason}"
            if threading.current_thread() is threading.main_thread():  # signal.signal works there only
                signal.signal(signal.SIGINT, signal.SIG_DFL)  # from now on Ctrl-C ends this rank at once
            _say(f"rank {self.rank}: {reason}; finishing this optimizer step, then saving a checkpoint and stopping"
                 + (" (Ctrl-C again stops at once, without that checkpoint)" if "SIGINT" in reason else ""))
        else:
            _say(f"rank {self.rank}: {reason} again; already stopping, the checkpoint save goes on "
                 f"(a checkpoint is published only once complete)")

    def _on_signal(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.reason is not None:  # Ctrl-C while stopping (asked from another thread)
            _say(f"rank {self.rank}: received SIGINT while stopping; stopping now, without a checkpoint of this step")
            os._exit(EXIT_INTERRUPTED)
        self.request(f"received {signal.Signals(signum).name}")

    def install(self, launched: bool) -> None:
        """Handle SIGTERM/SIGUSR1/SIGINT; when started by a launcher (``launched``), also stop once it is gone."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        if not launched:  # a bare ``python launch/train.py`` (e.g. under nohup) outlives its shell on purpose
            return
        parent = os.getppid()
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):  # not Linux: the watcher below still sees the parent go
            pass
        grandparent = parent_of(parent) if DEEPSPEED_NODE_LAUNCHER in _cmdline(parent) else None
        self._thread = threading.Thread(target=self._watch, args=(parent, grandparent), name="aligner-launcher-watch",
                                        daemon=True)
        self._thread.start()

    def _watch(self, parent: int, grandparent: int | None) -> None:
        while not self._done.wait(self.poll_s):
            if os.getppid() != parent:
                self.request(f"its launcher (pid {parent}) exited")
                return
            if grandparent is not None and parent_of(parent) != grandparent:
                self.request(f"the deepspeed command (pid {grandparent}) that started its launcher exited")
                return

    def close(self) -> None:
        """Stop the watcher thread (teardown)."""
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def saved(self) -> None:
        """A checkpoint was just written: the wall-clock interval starts again."""
        self.last_save = time.monotonic()

    def decide(self) -> tuple[bool, bool]:
        """(stop now, save now by the clock), the same on every rank. Collective: once per optimizer step."""
        due = self.rank == 0 and self.save_every_s > 0 and time.monotonic() - self.last_save >= self.save_every_s
        flags = torch.tensor([float(self.reason is not None), float(due)], device=comm_device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, save = flags.tolist()
        return bool(stop), bool(save)

    def reasons(self) -> list[str]:
        """Why each rank that asked to stop did (collective)."""
        mine = [self.reason] if self.reason else []
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return mine
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        return [r for part in gathered for r in part]
