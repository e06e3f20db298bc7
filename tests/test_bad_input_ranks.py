"""Bad input that used to end in a traceback, in the wrong error, or in a silent retrain.

The 2-rank cases check what the job says and exits with when only one rank, or
every rank, meets the error: one message, exit code 2, never "lost contact".
The single-process cases run ``main`` in-process (they fail before any process group).
"""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from aligner.recipes import train
from conftest import ROOT, launch

FAST = ["train.max_steps=2", "eval.every=0", "data.eval=null", "train.cache_static_logps=false"]


def three_rows(tmp_path: Path) -> str:
    path = tmp_path / "three.jsonl"
    rows = [{"prompt": f"sort {i} 3 1", "chosen": " 1 3", "rejected": " 3 1"} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"data.train={path}"


def under_a_file(tmp_path: Path) -> str:
    (tmp_path / "notes.txt").write_text("a regular file")
    return f"output_dir={tmp_path / 'notes.txt' / 'run'}"


def missing_model(tmp_path: Path) -> str:
    return f"model.name_or_path={tmp_path / 'no-such-model'}"


@pytest.mark.slow
@pytest.mark.parametrize("make, message", [
    (three_rows, "the dataset has 3 usable pairs, fewer than one step needs (train.micro_batch_size=8 x 2 ranks)"),
    (under_a_file, "cannot be created: Not a directory ("),
    (missing_model, "is not a model folder (no config.json there)"),
])
def test_an_error_on_one_rank_or_all_is_one_message_and_exit_2_on_two_ranks(tmp_path, make, message):
    overrides = [make(tmp_path)]
    if not overrides[0].startswith("output_dir"):
        overrides.append(f"output_dir={tmp_path / 'out'}")
    proc = launch(["--plugins", "dpo", "--set", *overrides, *FAST])
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    assert text.count("aligner: error:") == 1 and message in text, text[-3000:]  # rank 0 says it, once
    assert "Traceback" not in text and "lost contact" not in text


@pytest.mark.subprocess
def test_resume_auto_in_a_folder_that_never_held_a_run_is_refused(tmp_path):
    """A typo in output_dir: exit 2 and one line, never a silent retrain from step 0 (a real single-rank process)."""
    out = tmp_path / "ouptut"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--set", f"output_dir={out}", *FAST,
                           "--resume", "auto"], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (f"aligner: error: --resume auto: output_dir {out} holds no run to resume (no checkpoints, no config.json); "
            f"check output_dir for a typo, or leave out --resume to start a new run there") in proc.stderr
    assert "Traceback" not in proc.stderr and not (out / "checkpoints").exists()


def test_resume_auto_where_a_run_started_but_never_saved_starts_at_step_0_and_says_so(tmp_path, caplog):
    (tmp_path / "config.json").write_text("{}")  # the run got this far before it was stopped (e.g. a requeued job)
    with caplog.at_level(logging.WARNING, logger="aligner"):
        assert train.resume_auto(tmp_path) is None
    assert f"--resume auto: no checkpoint in {tmp_path} yet" in caplog.text and "starting from step 0" in caplog.text


@pytest.mark.parametrize("argv, message", [
    (["--plugins", ""], "aligner: error: --plugins '' names no plugin; name a loss (e.g. --plugins dpo)"),
    (["--plugins", " , "], "aligner: error: --plugins ' , ' names no plugin"),
    (["--set", "train.max_steps=0"], "aligner: error: --set train.max_steps=0: train.max_steps must be > 0, got 0"),
    (["--set", "train.save_every_minutes=-5"],
     "aligner: error: --set train.save_every_minutes=-5: train.save_every_minutes must be >= 0"),
    (["--set", "train.max_steps=many"], "aligner: error: --set train.max_steps=many: key 'train.max_steps' expects an integer"),
])
def test_empty_plugins_and_range_errors_name_where_the_value_came_from(argv, message, capsys):
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_range_error_from_the_yaml_file_names_the_file(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  max_steps: 10\n  micro_batch_size: 0\n")
    assert train.main(["--config", str(config), "--set", "train.max_steps=5"]) == 2
    assert f"aligner: error: {config}: train.micro_batch_size must be > 0, got 0" in capsys.readouterr().err
