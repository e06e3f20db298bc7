"""One job per output_dir (aligner/training/joblock.py): the lock's rules in-process, then real jobs on one folder.

The real-jobs scenario is one sequence of launches on one ``output_dir`` (each job two
bare rank processes in one process group, as a terminal's job is), and its checks share it:

A. trains, holds the lock (global rank 0 only) and saves every 2 steps;
B. a second job on the folder, without ``--resume``: refused at once, exit 2, naming A;
C. ``--resume auto`` while A still runs (a scheduler that relaunches as soon as the
   launcher returns, while the ranks still save): C waits for A's lock; then Ctrl-C to A
   (SIGINT to its process group): A finishes the step, saves, exits 5, and C resumes
   from that checkpoint; then Ctrl-C to C twice, the second
   while C saves (slowed by the faults plugin): C's ranks end at once, no traceback,
   nothing published, and C's lock is left behind;
D. ``--resume auto`` once more, after A's last checkpoint got a flipped byte: D takes
   over C's stale lock with a warning, skips the damaged checkpoint naming its file,
   resumes from the one before it and finishes; the lock is gone at the end.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from aligner.training import checkpoint, joblock
from conftest import ROOT, free_port

PLUGINS = ["--plugins", "dpo,plugin_fixtures.faults:faults"]
COMMON = ["train.max_steps=100000", "train.save_every=2", "train.keep_last=3", "eval.every=0", "data.eval=null",
          "train.cache_static_logps=false", "train.dist_timeout_s=120"]


# -- the lock's rules, in-process ---------------------------------------------------------------------------------
def gone_pid() -> int:
    """The pid of a process that has exited (and was reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(out: Path, beat_ago: float = 0.0, **holder) -> dict:
    """Another job's lock, its heartbeat (the file's modification time) ``beat_ago`` seconds old."""
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": joblock.pid_start(os.getpid()),
              "started": time.time(), "token": "theirs", "world_size": 1, **holder}
    path = joblock.lock_path(out)
    path.write_text(json.dumps(holder))
    os.utime(path, (time.time() - beat_ago, time.time() - beat_ago))
    return holder


def test_the_first_job_gets_the_lock_and_a_second_is_refused_naming_the_first(tmp_path):
    lock, holder = joblock.try_acquire(tmp_path, world_size=4)
    assert holder is None and lock is not None
    try:
        written = json.loads(joblock.lock_path(tmp_path).read_text())
        assert written["host"] == socket.gethostname() and written["pid"] == os.getpid() and written["world_size"] == 4
        assert written["pid_start"] == joblock.pid_start(os.getpid()) and written["started"] <= time.time()
        second, live = joblock.try_acquire(tmp_path)  # this process is alive: its lock is not stale
        assert second is None and live["token"] == lock.token
        message = str(joblock.refusal(joblock.lock_path(tmp_path), live, None))
        assert message.startswith(f"output_dir {tmp_path} is in use by another job (host {socket.gethostname()}, "
                                  f"pid {os.getpid()}, started ")
        assert "last heartbeat 0 s ago" in message and "choose another output_dir" in message
    finally:
        lock.release()
    assert not joblock.lock_path(tmp_path).exists()


def test_a_lock_whose_process_on_this_host_is_gone_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = gone_pid()
    write_lock(tmp_path, pid=dead, pid_start=12345)
    with caplog.at_level(logging.WARNING, logger="aligner"):
        lock, holder = joblock.try_acquire(tmp_path)
    assert holder is None and lock is not None
    lock.release()
    assert f"taking over from a job that is gone (host {socket.gethostname()}, pid {dead}," in caplog.text
    assert f"its process {dead} on this host is gone" in caplog.text


def test_a_reused_pid_is_not_the_holder(tmp_path):
    write_lock(tmp_path, pid_start=1)  # this process's pid, but another start time: the holder was another program
    lock, holder = joblock.try_acquire(tmp_path)
    assert holder is None
    lock.release()


def test_a_lock_from_another_host_is_stale_only_once_its_heartbeat_stopped(tmp_path):
    write_lock(tmp_path, beat_ago=5, host="elsewhere")
    assert joblock.try_acquire(tmp_path)[0] is None  # alive for all we know
    write_lock(tmp_path, beat_ago=joblock.STALE_S + 1, host="elsewhere")
    lock, holder = joblock.try_acquire(tmp_path)
    assert holder is None
    lock.release()


@pytest.mark.parametrize("round_", range(25))  # the race is one of timing: many rounds make a lost one likely
def test_of_several_jobs_taking_over_a_stale_lock_at_once_exactly_one_wins(tmp_path, round_):
    write_lock(tmp_path, pid=gone_pid())
    results, start = [], threading.Barrier(8)

    def take() -> None:
        start.wait()
        results.append(joblock.try_acquire(tmp_path))

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [lock for lock, _ in results if lock is not None]
    assert len(winners) == 1  # the others met the winner's lock: this process is alive
    assert json.loads(joblock.lock_path(tmp_path).read_text())["token"] == winners[0].token
    winners[0].release()


def test_the_heartbeat_refreshes_the_lock_and_never_overwrites_another_jobs_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(joblock, "HEARTBEAT_S", 0.02)
    lock, _ = joblock.try_acquire(tmp_path)
    path = joblock.lock_path(tmp_path)
    os.utime(path, (time.time() - 100, time.time() - 100))
    time.sleep(0.3)
    assert time.time() - joblock.read(path)["heartbeat"] < 5  # touched again
    for _ in range(20):  # taken over while this job seemed gone, while its heartbeat runs
        write_lock(tmp_path, token="another job's")
        time.sleep(0.01)
    time.sleep(0.1)
    lock.release()
    assert json.loads(path.read_text())["token"] == "another job's"


def test_hold_waits_for_the_holder_up_to_lock_wait_s_then_refuses(tmp_path, monkeypatch):
    monkeypatch.setattr(joblock, "POLL_S", 0.1)
    write_lock(tmp_path)  # a live holder: this very process
    with pytest.raises(joblock.LockError, match=r"is in use by another job .*\(waited \d+ s for it to finish, "
                                                r"train.lock_wait_s\)"):
        joblock.hold(tmp_path, wait_s=0.3, world_size=1)
    threading.Timer(0.5, joblock.lock_path(tmp_path).unlink).start()  # the holder finishes
    lock = joblock.hold(tmp_path, wait_s=30, world_size=1)
    assert lock is not None and json.loads(joblock.lock_path(tmp_path).read_text())["token"] == lock.token
    lock.release()


def test_lock_wait_s_is_validated():
    from aligner.config import ConfigError, apply_overrides, build_config

    with pytest.raises(ConfigError, match="train.lock_wait_s must be >= 0"):
        build_config(apply_overrides({}, ["train.lock_wait_s=-1"]))


# -- real jobs on one output_dir ----------------------------------------------------------------------------------
class Job:
    """One job: ``nproc`` bare rank processes (no launcher) in one process group, each with its log file."""

    def __init__(self, folder: Path, tag: str, out: Path, *overrides: str, resume: bool = False, nproc: int = 2):
        env = {**os.environ, "WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, str(ROOT / "launch" / "train.py"), *PLUGINS, "--set", f"output_dir={out}", *COMMON,
               *overrides, *(["--resume", "auto"] if resume else [])]
        self.logs = [folder / f"{tag}-rank{r}.log" for r in range(nproc)]
        self.procs: list[subprocess.Popen] = []
        for r, log in enumerate(self.logs):
            with log.open("w") as f:
                group = 0 if r == 0 else self.procs[0].pid  # one process group: rank 0's (Popen(process_group=) is 3.11+)
                self.procs.append(subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=ROOT,
                                                   stdout=f, stderr=subprocess.STDOUT,
                                                   preexec_fn=lambda g=group: os.setpgid(0, g)))

    def text(self, rank: int = 0) -> str:
        return self.logs[rank].read_text()

    def interrupt(self) -> None:
        """Ctrl-C: SIGINT to every process of the job, as the terminal sends it."""
        os.killpg(self.procs[0].pid, signal.SIGINT)

    def wait(self, timeout: float = 240) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(1, deadline - time.monotonic())) for p in self.procs]
        finally:
            self.kill()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def wait_for(condition, timeout: float = 240, every: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every)


@pytest.fixture(scope="module")
def two_jobs(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("two-jobs")
    out = folder / "out"
    jobs: list[Job] = []
    seen: dict = {"out": out, "folder": folder}
    try:
        a = Job(folder, "a", out)
        jobs.append(a)
        wait_for(lambda: (out / "checkpoints" / "step_2").is_dir())
        seen["lock_a"] = json.loads(joblock.lock_path(out).read_text())
        seen["lock_files_a"] = sorted(p.name for p in out.iterdir() if "lock" in p.name)
        seen["pids_a"] = [p.pid for p in a.procs]
        b = Job(folder, "b", out, nproc=1)
        c = Job(folder, "c", out, "faults.save_sleep_s=120", resume=True)  # relaunched before A has stopped
        jobs += [b, c]
        seen["codes_b"] = b.wait()
        wait_for(lambda: "is in use by another job" in c.text())
        a.interrupt()
        seen["codes_a"] = a.wait()
        wait_for(lambda: "resumed from" in c.text())
        seen["lock_c"] = json.loads(joblock.lock_path(out).read_text())
        c.interrupt()
        wait_for(lambda: all("received SIGINT; finishing" in c.text(r) for r in (0, 1)))
        c.interrupt()  # the second Ctrl-C, while C saves
        second = time.monotonic()
        seen["codes_c"] = c.wait(timeout=60)
        seen["c_took_s"] = time.monotonic() - second
        seen["after_c"] = {"listed": [p.name for p in checkpoint.list_checkpoints(out)],
                           "latest": (out / "checkpoints" / "latest").read_text(),
                           "lock": json.loads(joblock.lock_path(out).read_text())}
        last = checkpoint.list_checkpoints(out)[-1]
        seen["damaged"] = last / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        data = bytearray(seen["damaged"].read_bytes())
        data[len(data) // 2] ^= 0x01  # one flipped bit in the middle of a shard
        seen["damaged"].write_bytes(bytes(data))
        step = int(last.name.removeprefix("step_"))
        d = Job(folder, "d", out, f"train.max_steps={step + 1}", resume=True)
        jobs.append(d)
        seen["codes_d"] = d.wait()
        seen["jobs"] = {"a": a, "b": b, "c": c, "d": d}
        seen["stop_step"] = step
        return seen
    finally:
        for job in jobs:
            job.kill()


@pytest.mark.slow
def test_a_running_job_holds_one_lock_from_global_rank_0(two_jobs):
    lock = two_jobs["lock_a"]
    assert two_jobs["lock_files_a"] == [joblock.LOCK_NAME]  # one lock per job, not one per rank
    assert lock["pid"] == two_jobs["pids_a"][0] and lock["host"] == socket.gethostname() and lock["world_size"] == 2


@pytest.mark.slow
def test_a_second_job_on_the_same_output_dir_is_refused_with_exit_2_naming_the_holder(two_jobs):
    assert two_jobs["codes_b"] == [2]
    text = two_jobs["jobs"]["b"].text()
    assert (f"aligner: error: output_dir {two_jobs['out']} is in use by another job (host {socket.gethostname()}, "
            f"pid {two_jobs['pids_a'][0]}, started ") in text
    assert "Traceback" not in text


@pytest.mark.slow
def test_ctrl_c_stops_like_sigterm_finishing_the_step_saving_and_exiting_5(two_jobs):
    a = two_jobs["jobs"]["a"]
    assert two_jobs["codes_a"] == [5, 5], a.text()[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: received SIGINT; finishing this optimizer step, then saving a checkpoint and stopping " \
               f"(Ctrl-C again stops at once, without that checkpoint)" in a.text(rank)
        assert "Traceback" not in a.text(rank) and "KeyboardInterrupt" not in a.text(rank)
    line = re.search(r"aligner: (stopped after step (\d+) .*)", a.text()).group(1)
    assert line.endswith("is saved. To resume, rerun the same command with --resume auto")
    assert "rank 0: received SIGINT" in line or "rank 1: received SIGINT" in line


@pytest.mark.slow
def test_resume_auto_relaunched_at_once_waits_for_the_running_job_then_resumes_its_checkpoint(two_jobs):
    c = two_jobs["jobs"]["c"].text()
    a_stop = int(re.search(r"aligner: stopped after step (\d+)", two_jobs["jobs"]["a"].text()).group(1))
    assert f"output_dir {two_jobs['out']} is in use by another job (host {socket.gethostname()}, pid " \
           f"{two_jobs['pids_a'][0]}," in c and "--resume auto waits up to 600 s (train.lock_wait_s)" in c
    assert f"resumed from {two_jobs['out']}/checkpoints/step_{a_stop} at step {a_stop}" in c
    assert two_jobs["lock_c"]["pid"] == two_jobs["jobs"]["c"].procs[0].pid  # A released it; C took it


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_without_tracebacks_and_publishes_nothing(two_jobs):
    assert two_jobs["codes_c"] == [-signal.SIGINT, -signal.SIGINT]  # the kernel's default action: no handler ran
    assert two_jobs["c_took_s"] < 20  # the save was to sleep 120 s
    a_stop = int(re.search(r"aligner: stopped after step (\d+)", two_jobs["jobs"]["a"].text()).group(1))
    assert two_jobs["after_c"]["listed"][-1] == f"step_{a_stop}" and two_jobs["after_c"]["latest"] == f"step_{a_stop}"
    for rank in (0, 1):
        assert "Traceback" not in two_jobs["jobs"]["c"].text(rank)
    assert two_jobs["after_c"]["lock"]["pid"] == two_jobs["jobs"]["c"].procs[0].pid  # left behind: C had no time


@pytest.mark.slow
def test_the_next_job_takes_over_the_stale_lock_and_falls_back_from_a_damaged_checkpoint(two_jobs):
    d, out, step = two_jobs["jobs"]["d"].text(), two_jobs["out"], two_jobs["stop_step"]
    assert two_jobs["codes_d"] == [0, 0], d[-3000:]
    c_pid = two_jobs["jobs"]["c"].procs[0].pid
    assert f"taking over from a job that is gone (host {socket.gethostname()}, pid {c_pid}," in d
    assert f"its process {c_pid} on this host is gone" in d
    assert (f"--resume auto: checkpoint {out}/checkpoints/step_{step} is damaged (its file {two_jobs['damaged']} does "
            f"not match its digest (xxh3_128): its bytes changed since the save); trying the one before it") in d
    previous = checkpoint.list_checkpoints(out)[-3].name  # before step_{step} and the new step_{step + 1}
    assert f"resumed from {out}/checkpoints/{previous} at step" in d
    assert not joblock.lock_path(out).exists()  # released at the end of the run


@pytest.mark.slow
def test_every_checkpoint_records_the_size_and_digest_of_each_of_its_files(two_jobs):
    folder = checkpoint.list_checkpoints(two_jobs["out"])[0]  # written by A, both ranks
    files = json.loads((folder / checkpoint.MARKER).read_text())["files"]
    assert sorted(files) == sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                                   if p.is_file() and p.name != checkpoint.MARKER)
    assert {"rng_rank0.pt", "rng_rank1.pt", "faults/rank0.txt", "faults/rank1.txt"} <= set(files)
    for name, entry in files.items():
        assert entry == {"size": (folder / name).stat().st_size, "digest": checkpoint.file_digest(folder / name)}
