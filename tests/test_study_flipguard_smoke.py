"""CI's 2-step smoke version of the FlipGuard study (benchmarks/study_flipguard.py)."""

import csv
import subprocess
import sys

import pytest

from conftest import ROOT

STUDY = str(ROOT / "benchmarks/study_flipguard.py")
METHODS = {"dpo", "dpo+flipguard", "dpo+tr_soft+flipguard"}


def check_csv(path):
    rows = list(csv.DictReader(path.open()))
    assert {r["method"] for r in rows} == METHODS
    for r in rows:
        for col in ("policy_accuracy", "anchor_accuracy", "nfr", "pfr", "gen_nfr", "gen_pfr",
                    "gen_policy_reward", "gen_anchor_reward"):
            assert 0.0 <= float(r[col]) <= 1.0, (r["method"], col, r[col])
        assert float(r["median_step_time_s"]) > 0
    # one anchor, one eval set: every run sees the same anchor numbers
    assert len({(r["anchor_accuracy"], r["gen_anchor_reward"]) for r in rows}) == 1
    return rows


@pytest.mark.slow
def test_study_smoke_trains_each_method_and_writes_the_csv(tmp_path):
    proc = subprocess.run([sys.executable, STUDY, "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_csv(tmp_path / "study_flipguard.csv")
    for method in METHODS:
        assert f"| {method} |" in proc.stdout
        assert (tmp_path / "runs" / f"{method}-seed0" / "regression_eval.json").is_file()


def test_an_unknown_method_is_refused_before_training(tmp_path):
    proc = subprocess.run([sys.executable, STUDY, "--smoke", "--out", str(tmp_path), "--methods", "dpo,flipgaurd"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--methods: unknown method 'flipgaurd'" in proc.stderr
    assert "dpo+flipguard" in proc.stderr
    assert not (tmp_path / "runs").exists()
