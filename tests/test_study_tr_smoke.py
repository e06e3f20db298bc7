"""The trust-region study (benchmarks/study_tr.py): CI's smoke run and its rerun, bad options, and how its
statistics turn seeds into verdicts (benchmarks/study_stats.py)."""

import csv
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import study_stats  # noqa: E402
import study_tr  # noqa: E402

STUDY = str(ROOT / "benchmarks/study_tr.py")


@pytest.mark.slow
def test_smoke_trains_dpo_and_the_screen_scores_every_checkpoint_and_a_rerun_skips_them(tmp_path):
    cmd = [sys.executable, STUDY, "--smoke", "--stage", "dpo,screen", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "study_tr.csv").open()))
    assert {r["run"] for r in rows} == {"dpo-b0.05", "dpo-b0.05+tr_soft-a0.6-t1", "dpo-b0.05+tr_hard-t1"}
    assert {int(r["step"]) for r in rows} == {0, 1, 2}
    for r in rows:
        assert 0.0 <= float(r["gold"]) <= 1.0 and 0.0 <= float(r["gold_greedy"]) <= 1.0
        assert float(r["kl"]) == 0.0 if r["step"] == "0" else float(r["kl"]) >= 0.0  # exact per-token KL: never < 0
    assert any(float(r["kl"]) > 0 for r in rows if r["step"] != "0")
    assert "**Screen**" in proc.stdout
    assert (f"**Not finished:** stage confirm and the later ones; `python benchmarks/study_tr.py --smoke --out {tmp_path}` "
            "finishes them (finished runs are skipped)") in proc.stdout
    scores = sorted(tmp_path.glob("runs/*/scores.json"))
    assert len(scores) == 3
    assert not list(tmp_path.glob("runs/*/checkpoints"))  # scored, then deleted
    written = [p.stat().st_mtime_ns for p in scores]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"seed \d+: \d+ s \(train \d+ s\)", proc.stdout)  # each run's line, the first time
    assert not re.search(r"seed \d+: \d+ s \(train \d+ s\)", again.stdout)  # nothing trained again
    assert [p.stat().st_mtime_ns for p in scores] == written


@pytest.mark.parametrize("argv, message", [
    (["--tau-fractions", "1/32,3/2"], "--tau-fractions '1/32,3/2': 3/2 is not in (0, 1]"),
    (["--tau-fractions", "1/0"], "--tau-fractions '1/0'"),
    (["--steps", "100", "--checkpoints", "8"], "--steps 100 is not a multiple of --checkpoints 8"),
    (["--stage", "dpo,sceen"], "--stage: unknown stage 'sceen'"),
])
def test_a_bad_option_is_refused_with_what_to_give(argv, message, capsys):
    with pytest.raises(SystemExit):
        study_tr.parse_args(argv)
    assert message in capsys.readouterr().err


def result(name_tau: int | None, gold: list[list[float]], kl: list[list[float]]) -> study_tr.CellResult:
    """A cell's runs from given curves (rows: seeds, columns: checkpoints 0, 1, ...)."""
    cell = study_tr.Cell("dpo", 0.1, "tr_hard" if name_tau else "none", None, name_tau)
    runs = [[{"step": 10 * j, "gold": g, "gold_greedy": g, "kl": k} for j, (g, k) in enumerate(zip(gs, ks))]
            for gs, ks in zip(gold, kl)]
    return study_tr.CellResult(cell, list(range(len(gold))), runs, [1.0] * len(gold))


def test_gold_at_kl_is_read_where_each_run_first_reaches_it_and_undefined_past_its_reach():
    r = result(None, [[0.5, 0.7, 0.3], [0.5, 0.6, 0.6]], [[0.0, 2.0, 4.0], [0.0, 1.0, 1.5]])
    assert r.reach() == 1.5
    np.testing.assert_allclose(r.at_kl(1.0), [0.6, 0.6])
    assert np.isnan(r.at_kl(3.0)[1]) and r.at_kl(3.0)[0] == pytest.approx(0.5)
    assert study_tr.mean_all(r.at_kl(3.0)) != study_tr.mean_all(r.at_kl(3.0))  # NaN: not every run got there
    assert r.best()[0] == pytest.approx(0.65)  # the peak of the seed-mean curve, not the mean of each seed's peak


def curves(level: float, spread: float, n: int = 5, seed: int = 0) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    gold = [[0.5, level + spread * rng.standard_normal(), level - 0.1 + spread * rng.standard_normal()] for _ in range(n)]
    return gold, [[0.0, 1.0, 2.0]] * n


def test_a_tr_gain_is_supported_only_when_its_interval_excludes_0_and_a_loss_is_refuted():
    base = result(None, *curves(0.6, 0.01, seed=1))
    ahead = result(8, *curves(0.7, 0.01, seed=2))
    behind = result(8, *curves(0.5, 0.01, seed=3))
    spread = [-0.3, -0.15, 0.0, 0.15, 0.3]  # the baseline's mean, seeds far apart: every interval holds 0
    noisy = result(8, [[0.5, 0.6 + d, 0.5 + d] for d in spread], [[0.0, 1.0, 2.0]] * 5)
    levels = study_tr.matched_levels([ahead, base])
    assert levels == [0.5, 1.0, 2.0]
    assert study_tr.matched_claim(ahead, base, levels)[0] == "supported"
    assert study_tr.matched_claim(behind, base, levels)[0] == "refuted"
    word, diffs = study_tr.matched_claim(noisy, base, levels)
    assert word == "not resolved at this budget"
    assert all(lo < 0 < hi for _, lo, hi in diffs)
    est, lo, hi = study_tr.diff_best(ahead, base)
    assert est == pytest.approx(0.1, abs=0.02) and lo > 0
    assert study_stats.claim_word(lo, hi) == "supported"


def test_a_difference_is_called_lower_or_higher_only_when_its_interval_is_on_one_side_of_0():
    assert study_stats.compare_word(-0.30, -0.01) == "lower"
    assert study_stats.compare_word(0.01, 0.2) == "higher"
    for lo, hi in ((-0.30, 0.01), (-0.01, 0.30), (0.0, 0.1)):
        assert study_stats.compare_word(lo, hi).startswith("no different")
        assert study_stats.claim_word(lo, hi) == "not resolved at this budget"
    same = np.random.default_rng(0).normal(size=(5,))
    est, lo, hi = study_stats.bootstrap_diff(lambda runs: float(runs.mean()), same, same.copy())
    assert est == 0.0 and lo < 0 < hi


def test_a_tr_setting_is_recommended_only_when_its_gain_over_dpo_is_supported():
    args = study_tr.parse_args(["--steps", "240", "--checkpoints", "8"])
    base = result(None, *curves(0.6, 0.01, seed=1))

    def soft(level: float, alpha: float, tau: int) -> study_tr.CellResult:
        r = result(None, *curves(level, 0.01, seed=5))
        r.cell = study_tr.Cell("dpo", 0.1, "tr_soft", alpha, tau)
        return r

    ahead, level = soft(0.7, 0.6, 30), soft(0.6, 0.6, 30)
    _, found = study_tr.comparison_table([(ahead, base)])
    assert study_tr.recommendation([ahead], [ahead], args, found).startswith(
        "**Recommended:** tr_soft α = 0.6, τ = T/8 (30 of T = 240 steps), at DPO β = 0.1")
    _, found = study_tr.comparison_table([(level, base)])
    text = study_tr.recommendation([level], [level, soft(0.65, 0.1, 120)], args, found)
    assert text.startswith("**Recommended:** no trust-region setting over plain DPO at this budget")
    assert "least costly tr_soft cell (highest gold at the last checkpoint, 5 seeds) is α = 0.1, τ = T/2" in text
