"""The FlipGuard study (benchmarks/study_flipguard.py): CI's smoke run and its rerun, bad options, and the
wording of its verdicts."""

import csv
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import study_flipguard  # noqa: E402

STUDY = str(ROOT / "benchmarks/study_flipguard.py")
METHODS = {"dpo", "dpo+flipguard-g0.3-e0.001", "dpo+tr_soft+flipguard"}


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
def test_study_smoke_trains_each_method_writes_the_csv_and_a_rerun_skips_finished_runs(tmp_path):
    cmd = [sys.executable, STUDY, "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_csv(tmp_path / "study_flipguard.csv")
    for method in METHODS:
        assert f"| {method} |" in proc.stdout
        assert (tmp_path / "runs" / f"{method}-seed0" / "regression_eval.json").is_file()
    assert "| dpo+flipguard-g0.3-e0.001 | 1 | " in proc.stdout  # the cell's row, with its seed count
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert ": done (" not in again.stdout  # nothing trained or evaluated again
    assert "**Complete:** every cell at every seed." in again.stdout


@pytest.mark.parametrize("argv, message", [
    (["--methods", "dpo,flipgaurd"], "--methods: unknown method 'flipgaurd'"),
    (["--gammas", "0.3,one"], "--gammas/--epsilons: could not convert string to float: 'one'"),
])
def test_a_bad_option_is_refused_before_training(argv, message, capsys):
    with pytest.raises(SystemExit):
        study_flipguard.parse_args(argv)
    err = capsys.readouterr().err
    assert message in err
    if "methods" in message:
        assert "dpo+flipguard" in err


def rows(method: str, nfr: list[float], reward: list[float]) -> list[dict]:
    return [{"method": method, "nfr": n, "gen_nfr": n, "policy_accuracy": 0.8, "gen_policy_reward": r}
            for n, r in zip(nfr, reward)]


def test_nfr_is_called_lower_only_when_its_interval_is_below_0():
    base = rows("dpo", [0.50, 0.52, 0.48, 0.51, 0.49], [0.60, 0.61, 0.59, 0.60, 0.60])
    clear = rows("clear", [0.25, 0.27, 0.24, 0.26, 0.25], [0.75, 0.76, 0.74, 0.75, 0.75])
    overlapping = rows("overlapping", [0.05, 0.90, 0.10, 0.85, 0.30], [0.60, 0.61, 0.59, 0.60, 0.60])
    diffs = study_flipguard.differences(base + clear + overlapping)
    lo, hi = diffs["overlapping"]["nfr"][1:]
    assert diffs["overlapping"]["nfr"][0] < 0 and lo < 0 < hi  # a lower mean, but the interval contains 0
    text = study_flipguard.verdict(diffs)
    assert "clear: supported: preference NFR lower" in text
    assert "overlapping: not resolved at this budget: preference NFR no different" in text
    assert "gold reward higher" in text.split("overlapping")[0]


def test_a_report_from_part_of_the_study_shows_whole_cells_and_names_what_is_left(tmp_path, capsys):
    import json

    args = study_flipguard.parse_args(["--smoke", "--report-only", "--out", str(tmp_path)])
    cell = ("dpo", None, None)
    run_dir = tmp_path / "runs" / "dpo-seed0"
    run_dir.mkdir(parents=True)
    row = {"method": "dpo", "gamma": None, "epsilon": None, "seed": 0, "policy_accuracy": 0.8, "anchor_accuracy": 0.85,
           "nfr": 0.1, "pfr": 0.05, "gen_nfr": 0.5, "gen_pfr": 0.2, "gen_policy_reward": 0.6, "gen_anchor_reward": 0.7,
           "median_step_time_s": 0.2, "run_s": 30.0}
    (run_dir / "study_run.json").write_text(json.dumps({"signature": study_flipguard.signature(cell, 0, args), "row": row}))
    assert study_flipguard.main(["--smoke", "--report-only", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| dpo | 1 | 0.800 ± 0.000 |" in out
    assert (f"**Not finished:** dpo+flipguard-g0.3-e0.001 (0/1 seeds), dpo+tr_soft+flipguard (0/1 seeds); "
            f"`python benchmarks/study_flipguard.py --smoke --out {tmp_path}` completes them") in out
    assert "No finished method to compare with plain DPO yet." in out
    assert not (tmp_path / "runs" / "dpo+tr_soft+flipguard-seed0").exists()  # --report-only trains nothing
