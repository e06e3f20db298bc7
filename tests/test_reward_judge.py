"""launch/eval.py --reward-model: both models' greedy generations scored by a tiny reward model built here."""

import json
import runpy

import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from aligner.evaluation.reward_judge import rm_text
from conftest import ROOT

N_PROMPTS = 24


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tiny_tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=0)
    path = tmp_path_factory.mktemp("rm")
    LlamaForSequenceClassification(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    from aligner.data.synthetic import make_rows

    path = tmp_path_factory.mktemp("rm-data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_rows("eval", n=N_PROMPTS)))
    return path


@pytest.fixture(scope="module")
def judged(tmp_path_factory, reward_model_dir, random_model_dir, data_file):
    out = tmp_path_factory.mktemp("rm-eval") / "eval.json"
    main = runpy.run_path(str(ROOT / "launch/eval.py"))["main"]
    rc = main(["--model", str(random_model_dir), "--anchor", "embedded:tiny-sort", "--data", str(data_file),
               "--out", str(out), "--reward-model", str(reward_model_dir), "--batch-size", "5", "--epsilon", "0.01",
               "--max-new-tokens", "12"])
    assert rc == 0
    result = json.loads(out.read_text())
    return result, json.loads(open(result["reward_model"]["scores_file"]).read())


def test_per_prompt_scores_are_the_reward_models_own_unbatched_scores(judged, reward_model_dir, tiny_tokenizer):
    _, per_prompt = judged
    assert len(per_prompt) == N_PROMPTS
    rm = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    for row in per_prompt[:8]:
        for side in ("model", "anchor"):
            ids = tiny_tokenizer(rm_text(tiny_tokenizer, row["prompt"], row[f"{side}_response"]), return_tensors="pt",
                                 add_special_tokens=False)
            with torch.no_grad():
                alone = float(rm(**ids).logits[0, 0])  # one sequence, no padding: independent of the batching
            assert row[f"{side}_reward"] == pytest.approx(alone, abs=1e-5)
    assert any(r["model_response"] != r["anchor_response"] for r in per_prompt)  # two different models


def test_nfr_pfr_and_mean_rewards_follow_from_the_per_prompt_scores(judged):
    result, per_prompt = judged
    summary = result["reward_model"]
    gaps = [r["anchor_reward"] - r["model_reward"] for r in per_prompt]
    assert summary["negative_flip_rate"] == pytest.approx(sum(g > 0.01 for g in gaps) / N_PROMPTS)
    assert summary["positive_flip_rate"] == pytest.approx(sum(g < -0.01 for g in gaps) / N_PROMPTS)
    assert summary["policy_reward"] == pytest.approx(sum(r["model_reward"] for r in per_prompt) / N_PROMPTS)
    assert summary["negative_flip_rate"] + summary["positive_flip_rate"] > 0
    assert [r["flip"] for r in per_prompt].count("negative") == round(summary["negative_flip_rate"] * N_PROMPTS)


def test_a_reward_model_with_several_outputs_or_no_config_is_refused(tmp_path, tiny_tokenizer, random_model_dir,
                                                                    data_file, capsys):
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=2, pad_token_id=0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "two")
    main = runpy.run_path(str(ROOT / "launch/eval.py"))["main"]
    common = ["--model", str(random_model_dir), "--anchor", str(random_model_dir), "--data", str(data_file),
              "--out", str(tmp_path / "e.json")]
    assert main([*common, "--reward-model", str(tmp_path / "two")]) == 2
    err = capsys.readouterr().err
    assert f"--reward-model: {tmp_path / 'two'} has num_labels=2; a reward model has one score output" in err
    assert main([*common, "--reward-model", str(tmp_path / "missing")]) == 2
    assert (f"--reward-model: the folder {tmp_path / 'missing'} does not exist (and it is not a Hub ID of the form "
            f"org/name); give a reward model's folder") in capsys.readouterr().err
    # checked first: before the models are loaded and the generations made (here --model would fail later)
    assert main([*common[:1], str(tmp_path / "no-model"), *common[2:], "--reward-model", str(tmp_path / "two")]) == 2
    assert "--reward-model:" in capsys.readouterr().err
    assert main([*common, "--reward-model", "nobody/no-rm"]) == 2  # a Hub ID that is not in the cache (offline)
    assert "--reward-model: there is no folder nobody/no-rm, and as a Hub ID it cannot load" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([*common, "--reward-model", str(tmp_path / "two"), "--epsilon", "-1"])
    assert exc.value.code == 2 and "--epsilon must be >= 0, got -1.0" in capsys.readouterr().err


# eval.reward_model: the same judge during training (aligner/evaluation/reward_eval.py)

def test_eval_reward_model_refuses_a_run_without_eval_data_and_a_bad_model(tmp_path, reward_model_dir, tiny_tokenizer):
    from aligner.config import ConfigError, build_config
    from aligner.evaluation.reward_eval import RewardJudge
    from aligner.models import ModelError

    cfg = build_config({"data": {"eval": None}, "eval": {"reward_model": str(reward_model_dir)}})
    with pytest.raises(ConfigError, match="eval.reward_model judges generations on data.eval's prompts, but data.eval is null"):
        RewardJudge(cfg, tiny_tokenizer, rank=0)
    for rank in (0, 1):  # every rank refuses alike, so none waits for the others
        cfg = build_config({"eval": {"reward_model": str(tmp_path / "nope")}})
        with pytest.raises(ModelError, match=r"eval.reward_model: the folder .*/nope does not exist"):
            RewardJudge(cfg, tiny_tokenizer, rank=rank)
    with pytest.raises(ConfigError, match="eval.reward_epsilon must be >= 0, got -0.5"):
        build_config({"eval": {"reward_epsilon": -0.5}})


@pytest.mark.slow
def test_eval_reward_model_logs_generation_regression_against_the_policy_before_training(tmp_path, reward_model_dir,
                                                                                          data_file, tiny_tokenizer):
    from conftest import launch, read_scalars

    out = tmp_path / "run"
    proc = launch(["--config", "configs/tiny-cpu.yaml", "--plugins", "dpo", "--set", f"output_dir={out}",
                   "train.max_steps=3", "train.save_every=0", "eval.every=0", f"data.eval={data_file}",
                   f"eval.reward_model={reward_model_dir}", "eval.reward_max_new_tokens=10", "eval.reward_epsilon=0.001"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    scalars = read_scalars(out / "tensorboard")
    tag = "eval/regression/generation/"
    first = {k: dict(scalars[tag + k])[0] for k in ("policy_reward", "anchor_reward", "negative_flip_rate", "positive_flip_rate")}
    assert first["policy_reward"] == first["anchor_reward"] and first["negative_flip_rate"] == first["positive_flip_rate"] == 0
    assert dict(scalars[tag + "anchor_reward"])[3] == pytest.approx(first["anchor_reward"])  # the same anchor at the end
    anchor = json.loads((out / "reward_judge_anchor.json").read_text())
    rm = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    prompts = [json.loads(line)["prompt"] for line in data_file.read_text().splitlines()]
    rescored = []
    for prompt, response in zip(prompts, anchor["responses"]):
        ids = tiny_tokenizer(rm_text(tiny_tokenizer, prompt, response), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            rescored.append(float(rm(**ids).logits[0, 0]))
    assert len(rescored) == N_PROMPTS and first["anchor_reward"] == pytest.approx(sum(rescored) / N_PROMPTS, abs=1e-5)
