"""model.lora end to end: real 2-rank DeepSpeed runs on CPU, shared by every check below.

- ``soft_run``: TR-DPO (tr_soft) + FlipGuard, ZeRO-3, packing on, 8 steps, saves at 4 and 8, adapter export
  with the merged model; ``resumed``: the same config resumed from its step_4 in another output_dir.
- ``hard_run``: tr_hard + FlipGuard, ZeRO-2, packing off, chunked head, gradient checkpointing, no static
  cache (the anchor is the policy engine with its adapters off).
"""

import json
import math
import subprocess
import sys

import pytest
import torch

from aligner.training import checkpoint
from conftest import ROOT, check_plan_against_estimate, launch, read_scalars

LORA = ["model.lora.r=4", "eval.every=0", "data.max_length=48"]
SOFT = ["--config", "configs/tiny-cpu.yaml", "--plugins", "dpo,tr_soft,flipguard", "--set", *LORA,
        "train.max_steps=8", "train.save_every=4", "tr_soft.every=2", "train.packing=true", "export.merge_lora=true"]


def run(args: list[str]) -> subprocess.CompletedProcess:
    proc = launch(args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def soft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-soft")
    proc = run([*SOFT, f"output_dir={out}"])
    return out, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def resumed(soft_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-resumed")
    proc = run([*SOFT, f"output_dir={out}", "--resume", str(soft_run[0] / "checkpoints" / "step_4")])
    return out, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def hard_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-hard")
    proc = run(["--config", "configs/tiny-cpu.yaml", "--plugins", "dpo,tr_hard,flipguard", "--set", *LORA,
                f"output_dir={out}", "train.max_steps=5", "tr_hard.every=2", "train.packing=false",
                "train.zero_stage=2", "train.logps_chunk_tokens=16", "model.gradient_checkpointing=true",
                "train.cache_static_logps=false", "data.eval=null"])
    return out, proc.stdout + proc.stderr


@pytest.mark.slow
def test_step_one_is_ln2_and_a_hard_update_makes_the_next_step_ln2_again(hard_run):
    dpo = read_scalars(hard_run[0] / "tensorboard")["dpo/loss"]
    assert [s for s, _ in dpo] == [1, 2, 3, 4, 5]
    # The reference adapter is the policy's after steps 2 and 4, so the policy of steps 3 and 5 equals it.
    for step, value in dpo:
        assert (abs(value - math.log(2)) < 1e-6) == (step in (1, 3, 5)), dpo
    l2 = dict(read_scalars(hard_run[0] / "tensorboard")["tr/ref_policy_l2"])
    assert l2[2] < 1e-9 and l2[4] < 1e-9 and l2[3] > 1e-6


@pytest.mark.slow
def test_the_plan_and_the_estimator_agree_and_no_frozen_engine_is_built(soft_run, hard_run):
    soft = check_plan_against_estimate(soft_run[0], logs=soft_run[1])
    assert soft["built"]["reference"] == {"holds": "engine", "shares": "policy", "dtype": "float32"}
    assert soft["models"]["reference"]["adapters"] == "reference" and soft["built"]["anchor"]["holds"] == "cache"
    assert "reference = policy with its reference adapter, no engine of its own" in soft_run[1]
    hard = check_plan_against_estimate(hard_run[0], logs=hard_run[1])
    assert hard["built"]["anchor"] == {"holds": "engine", "shares": "policy", "dtype": "float32"}
    assert hard["models"]["anchor"]["adapters"] == "off"
    assert "anchor = policy with adapters off, no engine of its own" in hard_run[1]


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_losses_and_reference_exactly(soft_run, resumed):
    full, again = read_scalars(soft_run[0] / "tensorboard"), read_scalars(resumed[0] / "tensorboard")
    assert [s for s, _ in full["train/loss"]] == list(range(1, 9))
    assert again["train/loss"] == full["train/loss"][4:]  # bitwise: CPU fp32
    assert again["tr/ref_policy_l2"] == full["tr/ref_policy_l2"][4:]  # the moved reference adapter came back
    assert "resumed from" in resumed[1]


@pytest.mark.slow
def test_checkpoints_hold_the_adapters_not_the_base(soft_run):
    step = soft_run[0] / "checkpoints" / "step_4"
    assert (step / "tr_soft" / "reference_adapter.safetensors").is_file()
    meta = json.loads((step / checkpoint.MARKER).read_text())
    assert meta["lora"]["r"] == 4
    # 156k base parameters at 16 bytes each would be 2.5 MB; adapters (11k) and their Adam state are far less.
    shards = sum(p.stat().st_size for p in step.glob("*_states.pt"))
    assert shards < 600_000, shards


def _eval_examples(tokenizer):
    from aligner.data import load_rows, tokenize_dataset

    return tokenize_dataset(load_rows("embedded:eval"), tokenizer, 48, None, "error", "eval")[:24]


@pytest.mark.slow
def test_the_exported_adapter_and_the_merged_model_give_the_engine_log_probs(soft_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aligner.data import collate_pairs
    from aligner.scoring.logps import batch_logps

    final = soft_run[0] / "final"
    base_path = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), final).eval()
    merged = AutoModelForCausalLM.from_pretrained(final / "merged").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(final)
    engine = {r["id"]: r for r in map(json.loads, (soft_run[0] / "eval_logps.jsonl").read_text().splitlines())}
    examples = _eval_examples(tokenizer)
    for model in (adapter, merged):
        with torch.no_grad():
            chosen, rejected = batch_logps(model, collate_pairs(examples, tokenizer.pad_token_id))[0].chunk(2)
        for i, ex in enumerate(examples):
            assert engine[ex.id]["step"] == 8
            assert abs(engine[ex.id]["chosen"] - float(chosen[i])) < 1e-4
            assert abs(engine[ex.id]["rejected"] - float(rejected[i])) < 1e-4


@pytest.mark.slow
def test_resuming_a_lora_checkpoint_into_a_full_run_or_the_reverse_is_refused(soft_run, tmp_path):
    step = soft_run[0] / "checkpoints" / "step_4"
    proc = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--plugins", "dpo,tr_soft,flipguard",
                           "--set", f"output_dir={tmp_path}", "--resume", str(step)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"checkpoint {step} was written with lora = {{" in proc.stderr
    assert "this run has None; a LoRA checkpoint holds adapters and a full one all weights" in proc.stderr
    meta = checkpoint.read_meta(step)
    with pytest.raises(checkpoint.CheckpointError, match=r"was written with lora = None, this run has \{'alpha': 16.0"):
        checkpoint.check_compatible(step, {**meta, "lora": None}, meta)


@pytest.mark.slow
def test_the_adapter_and_the_merged_model_each_carry_a_model_card(soft_run):
    from huggingface_hub import ModelCard

    final = soft_run[0] / "final"
    adapter, merged = ModelCard.load(final / "README.md"), ModelCard.load(final / "merged" / "README.md")
    assert adapter.data.library_name == "peft" and merged.data.library_name == "transformers"
    for c in (adapter, merged):
        assert c.data.tags == ["aligner", "dpo", "tr_soft", "flipguard"]
        assert "LoRA | r=4, alpha=16.0, dropout=0.0, target_modules=all-linear" in c.text
        for arxiv in ("2305.18290", "2404.09656", "2410.00508"):  # DPO, TR-DPO, FlipGuard, from their docstrings
            assert f"[arXiv:{arxiv}](https://arxiv.org/abs/{arxiv})" in c.text
    assert 'AutoPeftModelForCausalLM.from_pretrained("path/to/final")' in adapter.text
    assert 'AutoModelForCausalLM.from_pretrained("path/to/final/merged")' in merged.text
