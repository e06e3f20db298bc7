"""DPO + FlipGuard through the real DeepSpeed launcher (2 ZeRO-3 ranks on CPU): cached anchor, TensorBoard, eval CLI."""

import json
import os
import runpy
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, check_plan_against_estimate, launch, read_scalars

N_TRAIN, N_EVAL = 2048, 256
ARGS = ["--config", "configs/tiny-cpu.yaml", "--plugins", "dpo,flipguard", "--set", "train.max_steps=6",
        "eval.every=3", "train.save_every=0"]
FLIP_TAGS = ["flipguard/flip_rate", "flipguard/constraint", "flipguard/reward_gap", "anchor/kl_estimate"]
REGRESSION_TAGS = ["policy_accuracy", "anchor_accuracy", "negative_flip_rate", "positive_flip_rate",
                   "policy_margin", "anchor_margin"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 6 steps with the static log-prob cache (default) and without it."""
    out = {}
    for name, extra in (("cached", []), ("uncached", ["train.cache_static_logps=false"])):
        folder = tmp_path_factory.mktemp(name)
        proc = launch([*ARGS, f"output_dir={folder}", *extra])
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out[name] = folder
    return out


@pytest.mark.slow
def test_anchor_and_reference_share_one_cache_computed_once(runs):
    files = sorted(p.name for p in (runs["cached"] / "static_logps").iterdir())
    assert files == ["anchor+reference.json", "anchor+reference.pt"]
    history = json.loads((runs["cached"] / "static_logps/anchor+reference.json").read_text())
    # One pre-pass, engine freed; of the train split only what 6 steps draw (2 ranks x 8 pairs each), all of eval.
    assert history["passes"] == [{"computed": 6 * 2 * 8 + N_EVAL, "reused": 0, "engine_released": True}]
    assert N_TRAIN > 6 * 2 * 8
    assert not (runs["uncached"] / "static_logps").exists()


@pytest.mark.slow
def test_cached_and_uncached_runs_give_the_same_losses(runs):
    cached, uncached = (read_scalars(runs[k] / "tensorboard") for k in ("cached", "uncached"))
    for tag in ("train/loss", "flipguard/constraint", "flipguard/flip_rate", "eval/loss",
                "eval/regression/negative_flip_rate"):
        a, b = cached[tag], uncached[tag]
        assert [s for s, _ in a] == [s for s, _ in b]
        assert all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(a, b)), (tag, a, b)


@pytest.mark.slow
def test_flip_metrics_in_tensorboard(runs):
    scalars = read_scalars(runs["cached"] / "tensorboard")
    assert set(FLIP_TAGS) <= set(scalars)
    assert {f"eval/regression/{t}" for t in REGRESSION_TAGS} <= set(scalars)
    assert [s for s, _ in scalars["eval/regression/negative_flip_rate"]] == [0, 3, 6]
    # Step 1: policy = anchor up to batch-padding noise, far below ε; nothing is flipped, the constraint adds 0.
    assert scalars["flipguard/flip_rate"][0] == (1, 0.0) and scalars["flipguard/constraint"][0] == (1, 0.0)
    at0 = {t: dict(scalars[f"eval/regression/{t}"])[0] for t in REGRESSION_TAGS}
    assert at0["negative_flip_rate"] == 0.0 and at0["positive_flip_rate"] == 0.0
    assert at0["policy_accuracy"] == at0["anchor_accuracy"] > 0.5  # the embedded anchor solves part of the task
    assert dict(scalars["eval/flipguard/flip_rate"])[0] == 0.0
    assert max(v for _, v in scalars["flipguard/flip_rate"]) > 0  # DPO at lr 1e-3 does push some examples down


def independent_regression(model_dir, anchor_dir, data_file):
    """Unbatched forwards with plain log_softmax: margins log π(y_w) − log π(y_l) of both models."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    margins = {}
    for name, path in (("model", model_dir), ("anchor", anchor_dir)):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        out = []
        for row in rows:
            prompt = tokenizer(row["prompt"])["input_ids"]
            scores = []
            for response in (row["chosen"], row["rejected"]):
                ids = prompt + tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                with torch.no_grad():
                    logits = model(torch.tensor([ids])).logits[0].double()
                logp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
                scores.append(float(logp[len(prompt) - 1:].sum()))
            out.append(scores[0] - scores[1])
        margins[name] = out
    pairs = list(zip(margins["model"], margins["anchor"]))
    return {
        "policy_accuracy": sum(m > 0 for m, _ in pairs) / len(pairs),
        "anchor_accuracy": sum(a > 0 for _, a in pairs) / len(pairs),
        "negative_flip_rate": sum(a > 0 >= m for m, a in pairs) / len(pairs),
        "positive_flip_rate": sum(m > 0 >= a for m, a in pairs) / len(pairs),
        "policy_margin": sum(margins["model"]) / len(pairs),
        "anchor_margin": sum(margins["anchor"]) / len(pairs),
    }


@pytest.mark.slow
def test_eval_cli_matches_an_independent_computation(runs, tmp_path):
    from aligner.data import embedded
    from aligner.data.synthetic import make_rows

    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows("eval", n=16)))
    anchor = embedded.ensure_embedded_model("embedded:tiny-sort")
    final = runs["cached"] / "final"
    proc = subprocess.run([sys.executable, str(ROOT / "launch/eval.py"), "--model", str(final), "--anchor", str(anchor),
                           "--data", str(data), "--out", str(tmp_path / "m.json")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = json.loads((tmp_path / "m.json").read_text())
    assert json.loads(proc.stdout[proc.stdout.index("{"):]) == written
    want = independent_regression(final, anchor, data)
    for key, value in want.items():
        assert abs(written["preference"][key] - value) < 1e-4, (key, written["preference"][key], value)
    gen = written["generation"]
    assert 0 <= gen["negative_flip_rate"] <= 1 and 0 <= gen["policy_reward"] <= 1 and gen["anchor_reward"] > 0.3

    # The anchor against itself: no flips under either judge.
    eval_main = runpy.run_path(str(ROOT / "launch/eval.py"))["main"]
    assert eval_main(["--model", str(anchor), "--anchor", str(anchor), "--data", str(data),
                      "--out", str(tmp_path / "same.json")]) == 0
    same = json.loads((tmp_path / "same.json").read_text())
    assert same["preference"]["negative_flip_rate"] == 0.0 and same["preference"]["positive_flip_rate"] == 0.0
    assert same["generation"]["negative_flip_rate"] == 0.0 and same["generation"]["positive_flip_rate"] == 0.0


@pytest.mark.slow
def test_a_stale_cache_stops_the_run_with_a_clear_error(runs, tmp_path):
    # The cached run's anchor+reference cache, in a run whose policy (so reference and anchor) is another model.
    from aligner.data.synthetic import make_rows

    shutil.copytree(runs["cached"] / "static_logps", tmp_path / "static_logps")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows("train", n=8)))
    proc = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--config", "configs/tiny-cpu.yaml",
                           "--plugins", "dpo,flipguard", "--set", f"output_dir={tmp_path}", f"data.train={data}",
                           "data.eval=null", f"model.name_or_path={runs['cached'] / 'final'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "anchor+reference.pt is stale: it was computed for other weights than" in proc.stderr
    assert "delete" in proc.stderr


@pytest.mark.subprocess
def test_missing_anchor_path_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--plugins", "dpo,flipguard", "--set",
                           f"output_dir={tmp_path}", f"flipguard.anchor_path={tmp_path / 'nowhere'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"flipguard.anchor_path: {tmp_path / 'nowhere'} is not a model folder" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cached", "uncached"])
def test_the_estimator_prints_the_plan_the_flipguard_runs_built(runs, kind):
    written = check_plan_against_estimate(runs[kind])
    # One engine or one cache for the anchor and the reference (the same weights while nothing moves them).
    assert written["built"]["anchor"]["shares"] == "reference"
    assert written["built"]["anchor"]["holds"] == ("cache" if kind == "cached" else "engine")
