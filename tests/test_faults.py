"""Faults injected through a test-only plugin (tests/plugin_fixtures/faults.py) into real 2-rank ZeRO-3 runs.

Every run uses the same plugin set (dpo + faults), so checkpoints fit each other
and the faults plugin adds nothing to the loss until a fault is due: the
uninterrupted run is the reference for exact resume.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aligner.training import checkpoint
from conftest import FAULT_PLUGINS as PLUGINS
from conftest import FAULT_SHORT as SHORT
from conftest import ROOT, free_port, launch, read_scalars
from conftest import fault_run as run


def tail(proc) -> str:
    return proc.stdout[-3000:] + proc.stderr[-3000:]


def losses(out: Path) -> list[tuple[int, float]]:
    return read_scalars(out / "tensorboard")["train/loss"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run: 8 steps, checkpoints at 3 and 6 and the end, the newest 2 kept."""
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = run(out, "train.keep_last=2")
    assert proc.returncode == 0, tail(proc)
    return out


@pytest.fixture(scope="module")
def killed_in_save(tmp_path_factory) -> dict:
    """Rank 1 is SIGKILLed while writing checkpoint step_6 (after the engine's shards, before publishing);
    then ``--resume auto`` finishes the run."""
    out = tmp_path_factory.mktemp("killed-in-save")
    killed = run(out, "train.keep_last=1", "faults.kill_in_save_at=6")
    after_kill = {"listed": [p.name for p in checkpoint.list_checkpoints(out)],
                  "entries": sorted(p.name for p in (out / "checkpoints").iterdir()),
                  "latest": (out / "checkpoints" / "latest").read_text(),
                  "staged": sorted(p.name for p in (out / "checkpoints" / ".tmp-step_6" / "step_6").iterdir())}
    resumed = run(out, "train.keep_last=1", resume=True)
    return {"out": out, "killed": killed, "resumed": resumed, **after_kill}


@pytest.mark.slow
def test_kill_during_save_leaves_the_previous_checkpoint_and_resume_auto_takes_it(killed_in_save):
    assert killed_in_save["killed"].returncode != 0  # the launcher reports the dead rank
    assert killed_in_save["listed"] == ["step_3"] and killed_in_save["latest"] == "step_3"
    assert ".tmp-step_6" in killed_in_save["entries"] and "step_6" not in killed_in_save["entries"]
    assert checkpoint.MARKER not in killed_in_save["staged"]  # the half-written save was never marked complete
    resumed = killed_in_save["resumed"]
    assert resumed.returncode == 0, tail(resumed)
    assert "resumed from" in resumed.stderr and "step_3 at step 3" in resumed.stderr
    # keep_last=1 pruned step_3 only once step_6 was complete; the staging folder is gone
    assert sorted(p.name for p in (killed_in_save["out"] / "checkpoints").iterdir()) == ["latest", "step_8"]


@pytest.mark.slow
def test_resumed_run_reproduces_the_uninterrupted_losses_exactly(reference, killed_in_save):
    expected = losses(reference)
    assert [s for s, _ in expected] == list(range(1, 9))
    # The killed run logged steps 1-6; the resumed one purges 4-6 and logs 4-8: each step once.
    assert len(list((killed_in_save["out"] / "tensorboard").iterdir())) == 2
    assert losses(killed_in_save["out"]) == expected  # bitwise: CPU fp32


@pytest.mark.slow
def test_keep_last_keeps_the_newest_complete_checkpoints(reference):
    assert [p.name for p in checkpoint.list_checkpoints(reference)] == ["step_6", "step_8"]
    assert (reference / "checkpoints" / "latest").read_text() == "step_8"
    meta = json.loads((reference / "checkpoints" / "step_8" / checkpoint.MARKER).read_text())
    assert meta["plugins"] == ["dpo", "faults"] and meta["world_size"] == 2 and meta["step"] == 8


@pytest.mark.slow
def test_a_dead_rank_ends_the_job_within_the_timeout_and_keeps_the_checkpoint(tmp_path):
    """No launcher to clean up: two bare processes, rank 1 SIGKILLed after step 3; rank 0 must fail on its own."""
    port = str(free_port())
    base = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), *PLUGINS, "--set", f"output_dir={tmp_path}", *SHORT,
           "train.save_every=2", "faults.kill_at_step=3", "train.dist_timeout_s=30"]
    logs = [(tmp_path / f"rank{r}.log").open("w") for r in (0, 1)]
    procs = [subprocess.Popen(cmd, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=ROOT,
                              stdout=logs[r], stderr=subprocess.STDOUT) for r in (0, 1)]
    try:
        assert procs[1].wait(timeout=240) == -signal.SIGKILL, (tmp_path / "rank1.log").read_text()[-3000:]
        died = time.monotonic()
        procs[0].wait(timeout=30 + 30)
        assert time.monotonic() - died < 30 + 30
    finally:
        for p, f in zip(procs, logs):
            if p.poll() is None:
                p.kill()
            f.close()
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_2"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_2"
    log0 = (tmp_path / "rank0.log").read_text()
    assert procs[0].returncode == 4, log0[-3000:]
    assert "aligner: error: rank 0 lost contact with another rank of this job" in log0, log0[-3000:]
    assert f"the last complete checkpoint, {tmp_path / 'checkpoints' / 'step_2'}, is intact" in log0
    assert "--resume auto" in log0 and "Traceback" not in log0
    assert "is deprecated" not in log0  # DeepSpeed's per-step FutureWarnings are filtered


@pytest.fixture(scope="module")
def nan_loss_stop(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Default train.on_nonfinite=stop; rank 1 alone gets a NaN loss at step 3."""
    out = tmp_path_factory.mktemp("nan-stop")
    return out, run(out, "train.save_every=0", "faults.nan_loss_at=3", "faults.nan_rank=1")


@pytest.mark.slow
def test_nan_loss_stops_with_a_checkpoint_and_names_step_and_examples(nan_loss_stop):
    out, proc = nan_loss_stop
    assert proc.returncode != 0
    line = re.search(r"aligner: stopped: (.*)", proc.stderr).group(1)  # after the progress bar's \r, on its line
    assert "non-finite loss at step 3 (examples sort-train-" in line and "saved checkpoint step_2" in line
    assert line.count("sort-train-") == 8  # the micro-batch of rank 1 only (micro_batch_size 8)
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step_2"]
    assert [s for s, _ in losses(out)] == [1, 2]  # the bad step never reached the optimizer or TensorBoard


@pytest.mark.slow
def test_skip_drops_a_nan_loss_micro_batch_and_a_nan_gradient_still_stops(tmp_path):
    """skip: rank 1's NaN loss at micro-batch 2 is dropped on both ranks (lock-step); micro-batch 5 (step 4)
    has a finite loss but NaN gradients, which no skip can take back: the run stops before that update."""
    proc = run(tmp_path, "train.on_nonfinite=skip", "faults.nan_loss_at=2", "faults.nan_rank=1", "faults.nan_grad_at=5")
    assert proc.returncode != 0
    assert "step 2: non-finite loss, micro-batch skipped (examples sort-train-" in proc.stderr
    assert "non-finite gradient at step 4" in proc.stderr and "saved checkpoint step_3" in proc.stderr
    scalars = read_scalars(tmp_path / "tensorboard")
    assert dict(scalars["train/nonfinite_skipped"]) == {1: 0.0, 2: 1.0, 3: 0.0}
    assert all(v == v for _, v in scalars["train/loss"])  # no NaN logged
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_3"]


@pytest.mark.slow
def test_resume_with_another_plugin_set_is_refused_before_loading(nan_loss_stop):
    out, _ = nan_loss_stop
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--plugins", "dpo", "--set",
                           f"output_dir={out}", *SHORT, "--resume", "auto"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2
    assert "was written with plugins = ['dpo', 'faults'], this run has ['dpo']; resume with the same --plugins" in proc.stderr


def test_checkpoint_of_another_model_or_world_size_is_refused(tmp_path):
    folder = tmp_path / "checkpoints" / "step_4"
    folder.mkdir(parents=True)
    meta = {"model": "embedded:tiny-sort", "architecture": {"hidden_size": 64}, "plugins": ["dpo"], "world_size": 2}
    (folder / checkpoint.MARKER).write_text(json.dumps(meta))
    assert checkpoint.read_meta(folder) == meta
    with pytest.raises(checkpoint.CheckpointError, match=r"model = 'embedded:tiny-sort', this run has 'my/model'"):
        checkpoint.check_compatible(folder, meta, {**meta, "model": "my/model"})
    with pytest.raises(checkpoint.CheckpointError, match=r"architecture = \{'hidden_size': 64\}.*another model's weights"):
        checkpoint.check_compatible(folder, meta, {**meta, "architecture": {"hidden_size": 128}})
    with pytest.raises(checkpoint.CheckpointError, match=r"world_size = 2, this run has 4; resume with the same number"):
        checkpoint.check_compatible(folder, meta, {**meta, "world_size": 4})


def test_resume_from_a_half_written_or_missing_folder_is_refused(tmp_path):
    staged = tmp_path / "checkpoints" / ".tmp-step_6" / "step_6"
    staged.mkdir(parents=True)
    (staged / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"partial")
    with pytest.raises(checkpoint.CheckpointError, match=r"not a complete aligner checkpoint .*use --resume auto"):
        checkpoint.read_meta(staged)
    with pytest.raises(checkpoint.CheckpointError, match=r"no such checkpoint folder"):
        checkpoint.read_meta(tmp_path / "nowhere")
    assert checkpoint.list_checkpoints(tmp_path) == [] and checkpoint.latest_checkpoint(tmp_path) is None


def test_model_folder_without_a_tokenizer_is_a_clear_error(tmp_path, tiny_tokenizer):
    from aligner.data import embedded
    from aligner.models import ModelError, loading

    embedded.build_model(len(tiny_tokenizer), seed=3).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=r"(?s)has no usable tokenizer .*tokenizer.save_pretrained"):
        loading.load_tokenizer(tmp_path)


@pytest.mark.parametrize("key, value, problem", [
    ("train.on_nonfinite", "ignore", "train.on_nonfinite must be one of stop, skip"),
    ("train.keep_last", "-1", "train.keep_last must be >= 0"),
    ("train.dist_timeout_s", "0", "train.dist_timeout_s must be > 0"),
    ("train.save_every_minutes", "-5", "train.save_every_minutes must be >= 0"),
])
def test_fault_handling_keys_are_validated(key, value, problem):
    from aligner.config import ConfigError, apply_overrides, build_config

    with pytest.raises(ConfigError, match=problem):
        build_config(apply_overrides({}, [f"{key}={value}"]))


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_after_the_step_with_one_checkpoint(signalled):
    stopped = signalled["stopped"]
    assert stopped.returncode == 5, tail(stopped)  # preempt.EXIT_PREEMPTED, passed on by the launcher
    assert signalled["listed"] == ["step_3", "step_4"] and signalled["latest"] == "step_4"
    assert signalled["entries"] == ["latest", "step_3", "step_4"] and not signalled["final"]  # nothing half-written
    assert "rank 1: received SIGUSR1; finishing this optimizer step" in stopped.stderr
    assert "rank 1: received SIGTERM again; already stopping, the checkpoint save goes on" in stopped.stderr
    line = re.search(r"aligner: (stopped after step .*)", stopped.stderr).group(1)
    assert line == (f"stopped after step 4 (rank 1: received SIGUSR1); checkpoint {signalled['out']}/checkpoints/step_4 "
                    f"is saved. To resume, rerun the same command with --resume auto")
    assert "Traceback" not in stopped.stderr and "lost contact" not in stopped.stderr


@pytest.mark.slow
def test_resume_after_a_signal_reproduces_the_uninterrupted_losses_exactly(reference, signalled):
    resumed = signalled["resumed"]
    # 6: trained to the end, then the push to the Hub failed offline (tests/test_loggers_e2e.py reads the rest)
    assert resumed.returncode == 6, tail(resumed)
    assert "step_4 at step 4" in resumed.stderr
    assert losses(signalled["out"]) == losses(reference)  # bitwise: CPU fp32


@pytest.mark.slow
def test_a_file_size_limit_during_a_save_keeps_the_last_checkpoint_and_names_path_and_bytes(tmp_path):
    """Rank 1's RLIMIT_FSIZE drops to 4 KiB after step 4 (the kernel enforces it): step_6 cannot be written."""
    proc = run(tmp_path, "faults.fsize_limit_after_step=4")
    assert proc.returncode == 2, tail(proc)
    line = re.search(r"aligner: error: (.*)", proc.stderr).group(1)
    size = checkpoint.tree_bytes(tmp_path / "checkpoints" / "step_3")
    assert line.startswith(f"checkpoint step_6 was not saved: rank 1 could not write {tmp_path}/checkpoints/.tmp-step_6/")
    assert "file-size limit (ulimit -f) is 4,096 bytes" in line and f"needs about {size:,} bytes" in line
    assert f"the last complete checkpoint, {tmp_path}/checkpoints/step_3, is intact and --resume auto takes it" in line
    assert f"saved checkpoint {tmp_path}/checkpoints/step_3: {size:,} bytes" in proc.stderr  # the first save's size
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_3"]
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_3"
    assert "Traceback" not in proc.stderr and "lost contact" not in proc.stderr


def _children(pid: int) -> list[int]:
    from aligner.training.preempt import parent_of

    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and parent_of(int(p.name)) == pid]


@pytest.mark.slow
@pytest.mark.parametrize("target, sig, reason", [
    ("deepspeed", signal.SIGTERM, "the deepspeed command (pid {pid}) that started its launcher exited"),
    ("node launcher", signal.SIGKILL, "received SIGTERM"),  # PR_SET_PDEATHSIG: the kernel's signal
])
def test_ranks_whose_launcher_died_stop_with_a_checkpoint_instead_of_training_on(tmp_path, target, sig, reason):
    """The issue's case: SIGTERM to the ``deepspeed`` command kills it at once (DeepSpeed's runner has no handler),
    and SIGKILL to DeepSpeed's per-node launcher leaves no one to pass a signal on; the ranks must stop anyway."""
    deepspeed = Path(sys.executable).with_name("deepspeed")
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "launch" / "train.py"),
           *PLUGINS, "--set", f"output_dir={tmp_path / 'out'}", "train.max_steps=400",
           "eval.every=0", "data.eval=null", "train.cache_static_logps=false",
           "train.save_every=0", "train.save_every_minutes=0.0001"]  # rank 0's clock: a save after every step
    with (tmp_path / "log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while not (tmp_path / "out" / "checkpoints" / "step_2").is_dir() and time.monotonic() < deadline:
                time.sleep(0.2)
            pid = proc.pid if target == "deepspeed" else _children(proc.pid)[0]
            os.kill(pid, sig)
            while _session_alive(proc.pid, proc) and time.monotonic() < deadline:  # the ranks stop; all are gone
                time.sleep(0.2)
        finally:
            if _session_alive(proc.pid, proc):
                os.killpg(proc.pid, signal.SIGKILL)
    text = (tmp_path / "log").read_text()
    assert not _session_alive(proc.pid, proc), text[-3000:]
    step = int(re.search(r"aligner: stopped after step (\d+)", text).group(1))
    assert 2 <= step < 400 and not (tmp_path / "out" / "final").exists(), text[-3000:]
    assert checkpoint.latest_checkpoint(tmp_path / "out").name == f"step_{step}"
    # The ranks agree on the stop after each step: the rank that noticed first decides for both, so a fast step can
    # stop the other rank before it polls its own parent. What must hold: a rank noticed, and the stop names it.
    noticed = [r for r in (0, 1) if f"rank {r}: {reason.format(pid=proc.pid)}; finishing this optimizer step" in text]
    assert noticed, text[-3000:]
    stop_line = re.search(rf"aligner: stopped after step {step} \((.*)\); checkpoint", text).group(1)
    assert f"rank {noticed[0]}: {reason.format(pid=proc.pid)}" in stop_line, stop_line
    assert "Traceback" not in text


def _session_alive(sid: int, leader: subprocess.Popen) -> bool:
    """Whether any process of session ``sid`` is left (its leader is reaped first: a zombie counts)."""
    leader.poll()
    try:
        os.killpg(sid, 0)
    except ProcessLookupError:
        return False
    return True
