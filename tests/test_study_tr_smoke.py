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


def test_a_scorer_that_cannot_be_loaded_is_refused_before_training(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/study_tr.py"), "--smoke", "--out", str(tmp_path),
                           "--methods", "none", "--scorer", "no_such_module:score"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--scorer no_such_module:score: cannot load it" in proc.stderr
    assert "module:function(prompt, response) -> float" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_a_user_scorer_and_prompts_file_are_used(tmp_path):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("study_tr", ROOT / "benchmarks/study_tr.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["a", "b", "c"]))
    args = study.parse_args(["--prompts-file", str(prompts), "--prompts", "2", "--scorer", "aligner.data.synthetic:gold_reward"])
    assert study.load_prompts(args) == ["a", "b"]
    from aligner.data.synthetic import gold_reward

    assert study.load_scorer(args.scorer) is gold_reward
    prompts.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(SystemExit, match="row 1 has no string 'prompt'"):
        study.load_prompts(args)
