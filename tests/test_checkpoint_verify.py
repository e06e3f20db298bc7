"""Verified checkpoints (aligner/training/checkpoint.py): the marker records each file's size and digest, and a resume checks
them first. Real files written by torch.save, a marker written by the same code as a save (one process).

The end-to-end case (a real 2-rank checkpoint with a flipped byte, skipped by ``--resume auto``) is in
tests/test_joblock.py, on the checkpoints of its real jobs.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from aligner.training import checkpoint

SHARD = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def make_checkpoint(output_dir: Path, step: int) -> Path:
    """A complete checkpoint folder: two shards, an RNG file and a plugin's subfolder, its marker with ``files``."""
    folder = checkpoint.checkpoint_root(output_dir) / f"step_{step}"
    (folder / "faults").mkdir(parents=True)
    torch.save({"exp_avg": torch.randn(64, 1024, generator=torch.Generator().manual_seed(step))}, folder / SHARD)
    torch.save({"w": torch.arange(100.0)}, folder / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    torch.save(checkpoint.rng_state(), folder / "rng_rank0.pt")
    (folder / "faults" / "rank0.txt").write_text("3")
    marker = {"step": step, "world_size": 1, "files": checkpoint.record_files(folder)}
    (folder / checkpoint.MARKER).write_text(json.dumps(marker))
    return folder


def truncate(folder: Path) -> str:
    data = (folder / SHARD).read_bytes()
    (folder / SHARD).write_bytes(data[: len(data) // 2])
    return f"its file {folder / SHARD} has {len(data) // 2:,} bytes, {len(data):,} when saved (truncated or overwritten)"


def flip_a_byte(folder: Path) -> str:
    data = bytearray((folder / SHARD).read_bytes())
    data[len(data) - 100] ^= 0x80
    (folder / SHARD).write_bytes(bytes(data))
    return f"its file {folder / SHARD} does not match its digest (xxh3_128): its bytes changed since the save"


def remove_a_file(folder: Path) -> str:
    (folder / "faults" / "rank0.txt").unlink()
    return f"its file {folder / 'faults' / 'rank0.txt'} is missing"


def add_a_file(folder: Path) -> str:
    (folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"from another run")
    return (f"an extra file {folder / 'zero_pp_rank_1_mp_rank_00_optim_states.pt'}, which the checkpoint did not hold "
            f"when it was saved")


DAMAGE = [truncate, flip_a_byte, remove_a_file, add_a_file]


def test_the_marker_records_the_size_and_digest_of_every_file(tmp_path):
    folder = make_checkpoint(tmp_path, 3)
    files = checkpoint.read_meta(folder)["files"]
    assert sorted(files) == ["faults/rank0.txt", "rng_rank0.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt", SHARD]
    assert files[SHARD]["size"] == (folder / SHARD).stat().st_size
    assert files[SHARD]["digest"].startswith("xxh3_128:") and len(files[SHARD]["digest"]) == len("xxh3_128:") + 32
    assert checkpoint.verify(folder, checkpoint.read_meta(folder)) is None


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_a_damaged_checkpoint_is_found_and_the_file_named(tmp_path, damage):
    folder = make_checkpoint(tmp_path, 3)
    expected = damage(folder)
    assert checkpoint.verify(folder, checkpoint.read_meta(folder)) == expected


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_resume_of_a_named_damaged_checkpoint_is_refused_naming_the_file(tmp_path, damage):
    folder = make_checkpoint(tmp_path, 3)
    expected = damage(folder)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.verified_resume(folder, auto=False, output_dir=tmp_path)
    assert str(info.value) == (f"--resume {folder}: the checkpoint is damaged: {expected}. Resume from another "
                               f"checkpoint (--resume auto takes the newest one that verifies)")


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_resume_auto_falls_back_to_the_newest_checkpoint_that_verifies_with_a_warning(tmp_path, damage, caplog):
    older, middle, newest = (make_checkpoint(tmp_path, s) for s in (2, 4, 6))
    expected = damage(newest)
    flip_a_byte(middle)
    with caplog.at_level(logging.WARNING, logger="aligner"):
        assert checkpoint.verified_resume(newest, auto=True, output_dir=tmp_path) == older
    assert f"--resume auto: checkpoint {newest} is damaged ({expected}); trying the one before it" in caplog.text
    assert f"checkpoint {middle} is damaged" in caplog.text
    assert f"resuming from {older}, the newest checkpoint that verifies" in caplog.text


def test_resume_auto_with_no_checkpoint_that_verifies_is_refused(tmp_path):
    folder = make_checkpoint(tmp_path, 2)
    problem = truncate(folder)
    with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint in .* verifies \(step_2: " + problem.replace(
            "(", r"\(").replace(")", r"\)") + r"\)\. Restore them from a copy, or start afresh with --overwrite"):
        checkpoint.verified_resume(folder, auto=True, output_dir=tmp_path)


def test_a_damaged_marker_is_skipped_by_resume_auto(tmp_path):
    older, newest = make_checkpoint(tmp_path, 2), make_checkpoint(tmp_path, 4)
    (newest / checkpoint.MARKER).write_text('{"step": 4, "files": {')  # cut short by a bad copy
    assert checkpoint.verified_resume(newest, auto=True, output_dir=tmp_path) == older


def test_a_checkpoint_from_before_digests_resumes_with_a_warning(tmp_path, caplog):
    folder = make_checkpoint(tmp_path, 2)
    meta = checkpoint.read_meta(folder)
    del meta["files"]
    (folder / checkpoint.MARKER).write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="aligner"):
        assert checkpoint.verified_resume(folder, auto=False, output_dir=tmp_path) == folder
    assert "records no file digests (written by an older aligner); resuming from it without verifying" in caplog.text


def test_a_copied_checkpoint_verifies(tmp_path):
    """Digests depend on the bytes only, not on paths or times: a checkpoint copied elsewhere still verifies."""
    folder = make_checkpoint(tmp_path / "a", 2)
    copy = tmp_path / "b" / "checkpoints" / "step_2"
    shutil.copytree(folder, copy)
    assert checkpoint.verify(copy, checkpoint.read_meta(copy)) is None
