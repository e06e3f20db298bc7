"""CI's 2-step smoke version of the trust-region study (benchmarks/study_tr.py)."""

import csv
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_study_smoke_trains_each_method_and_writes_the_csv(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/study_tr.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "study_tr.csv").open()))
    assert {r["run"] for r in rows} == {"dpo", "dpo+tr_soft", "dpo+tr_hard"}
    assert {int(r["step"]) for r in rows} == {0, 1, 2}
    for r in rows:
        assert 0.0 <= float(r["gold_greedy"]) <= 1.0
        assert float(r["kl"]) == 0.0 if r["step"] == "0" else abs(float(r["kl"])) < 50
    assert "| dpo+tr_soft |" in proc.stdout
