"""The bad-input sweep's cases that need no engine, in-process (benchmarks/bad_input_sweep.py holds the table).

Each case is what a new user types; the check is what they read: the exit code, a message
naming the problem, the file/row/key and the fix, and no traceback. Config errors go through
``aligner.recipes.train.main`` itself; later ones through the same functions the recipe calls up to
the stage that refuses them (data, models, output_dir and checkpoints), and the eval and
estimate tools through their ``main``. The cases that need real runs (signals, faults, two
ranks, a second job) are run by the script, and several by tests/test_faults.py and
tests/test_joblock.py.
"""

from __future__ import annotations

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import bad_input_sweep as sweep  # noqa: E402

IN_PROCESS = [c for c in sweep.CASES if c.stage is not None]


def test_the_sweep_has_58_cases_in_every_group():
    assert len(sweep.CASES) == 58 and len({c.name for c in sweep.CASES}) == 58
    assert {c.group for c in sweep.CASES} == {"config", "plugins", "data", "models", "tools", "checkpoints", "signals"}


@pytest.mark.parametrize("case", IN_PROCESS, ids=[c.name for c in IN_PROCESS])
def test_bad_input_is_refused_with_its_exit_code_and_a_message_that_names_it(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default output_dir (runs/tiny) must not land in the checkout
    code, text = sweep.in_process(case, tmp_path)
    assert code == case.code, text[-3000:]
    assert case.says.format(tmp=tmp_path) in text, text[-3000:]
    assert "Traceback" not in text
