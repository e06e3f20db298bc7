"""Trust-region reference updates (tr_soft, tr_hard) in real 2-rank ZeRO-3 runs on CPU.

A test-only plugin (tests/plugin_fixtures/tr_probe.py) writes, after every optimizer step, the gathered policy
(fp32 master), reference and anchor weights and the reference/anchor log-probs of that step's micro-batches.
The reference is then checked against the update rule applied to the recorded policy history.
"""

from __future__ import annotations

import pytest
import torch

from conftest import check_plan_against_estimate, launch, read_scalars

PROBE = "plugin_fixtures.tr_probe:tr_probe"
# The runs also compose the roles: TR-DPO with FlipGuard (soft), TR-IPO (hard).
SOFT_PLUGINS = f"dpo,tr_soft,flipguard,{PROBE}"
SOFT_ALPHA = 0.01
# The probe reads the anchor engine itself, so the anchor is kept as an engine (no static log-prob cache).
COMMON = ["--set", "data.eval=null", "train.save_every=0", "train.log_every=1", "train.cache_static_logps=false"]


def _run(out, config: str, plugins: str, *sets: str, resume: bool = False):
    args = ["--config", config, *COMMON, f"output_dir={out}", f"tr_probe.dump_dir={out / 'probe'}", *sets, "--plugins", plugins]
    proc = launch(args + (["--resume", "auto"] if resume else []))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def soft_run(tmp_path_factory):
    """tr_soft α=0.01, τ=2: 4 steps (checkpoint at 4), then resumed to 7 steps."""
    out = tmp_path_factory.mktemp("tr-soft")
    sets = [f"tr_soft.alpha={SOFT_ALPHA}", "tr_soft.every=2"]
    _run(out, "configs/tiny-cpu-tr.yaml", SOFT_PLUGINS, *sets, "train.max_steps=4")
    _run(out, "configs/tiny-cpu-tr.yaml", SOFT_PLUGINS, *sets, "train.max_steps=7", resume=True)
    return out


@pytest.fixture(scope="module")
def hard_run(tmp_path_factory):
    """tr_hard τ=2, 5 steps, on the fast path (packed batches, chunked log-probs): the reference's log-probs
    are then checked against a padded, full-logits HF forward (test_reference_forward_after_an_update...)."""
    out = tmp_path_factory.mktemp("tr-hard")
    _run(out, "configs/tiny-cpu.yaml", f"ipo,tr_hard,{PROBE}", "tr_hard.every=2", "train.max_steps=5",
         "train.packing=true", "train.logps_chunk_tokens=16")
    return out


@pytest.fixture(scope="module")
def initial_weights():
    from transformers import AutoModelForCausalLM

    from aligner.data import embedded

    model = AutoModelForCausalLM.from_pretrained(embedded.ensure_embedded_model("embedded:tiny-sort"))
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def _dumps(out) -> dict[int, dict]:
    return {int(p.stem.split("_")[1]): torch.load(p, weights_only=False) for p in (out / "probe").glob("step_*.pt")}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def _relative_l2(ref: dict[str, torch.Tensor], pol: dict[str, torch.Tensor]) -> float:
    num = sum(float((ref[n].double() - pol[n].double()).square().sum()) for n in ref)
    den = sum(float(pol[n].double().square().sum()) for n in ref)
    return (num / den) ** 0.5


@pytest.mark.slow
def test_soft_reference_follows_the_formula_and_survives_resume(soft_run, initial_weights):
    dumps = _dumps(soft_run)
    assert sorted(dumps) == list(range(1, 8))
    expected = {n: t.clone() for n, t in initial_weights.items()}
    for step in range(1, 8):
        if step % 2 == 0:  # θ_ref ← α·θ + (1−α)·θ_ref at τ, 2τ, … (the resumed run continues from the saved reference)
            for n in expected:
                expected[n] = expected[n] * (1 - SOFT_ALPHA) + dumps[step]["policy"][n] * SOFT_ALPHA
        err = _max_diff(dumps[step]["reference"], expected)
        print(f"exactness tr_soft alpha={SOFT_ALPHA} step {step}: max |ref - formula| = {err:.3e}")
        assert err < 1e-6, f"step {step}"
        assert dumps[step]["reference_dtype"] == "torch.float32"
    # The check can fail: by step 4 the reference has moved measurably away from the initial model, so a resume
    # that restarted from the initial reference would break the equality at step 5.
    assert _max_diff(dumps[4]["reference"], initial_weights) > 1e-5
    assert _max_diff(dumps[5]["reference"], dumps[4]["reference"]) == 0.0


@pytest.mark.slow
def test_soft_run_logs_updates_and_distance_to_tensorboard(soft_run):
    scalars = read_scalars(soft_run / "tensorboard")
    assert scalars["tr/updates"] == [(s, float(s // 2)) for s in range(1, 8)]
    dumps = _dumps(soft_run)
    for step, value in scalars["tr/ref_policy_l2"]:
        assert value == pytest.approx(_relative_l2(dumps[step]["reference"], dumps[step]["policy"]), rel=1e-4)
    assert {"rewards/chosen", "rewards/margins", "train/loss"} <= set(scalars)
    assert {"flipguard/flip_rate", "flipguard/constraint", "anchor/kl_estimate"} <= set(scalars)  # composed with flipguard
    assert (soft_run / "checkpoints" / "step_7" / "tr_soft" / "reference_rank00001.safetensors").is_file()


@pytest.mark.slow
def test_hard_reference_equals_policy_at_each_update_and_holds_between(hard_run, initial_weights):
    dumps = _dumps(hard_run)
    assert sorted(dumps) == [1, 2, 3, 4, 5]
    # TR-IPO: policy = reference at step 1, so IPO's loss is (1/(2β))² = 25 at β = 0.1.
    assert read_scalars(hard_run / "tensorboard")["train/loss"][0][1] == pytest.approx(25.0, rel=1e-6)
    assert _max_diff(dumps[1]["reference"], initial_weights) == 0.0
    for step in (2, 4):
        err = _max_diff(dumps[step]["reference"], dumps[step]["policy"])
        held = _max_diff(dumps[step + 1]["reference"], dumps[step]["reference"])
        print(f"exactness tr_hard (alpha=1) step {step}: max |ref - policy| = {err:.3e}; "
              f"step {step + 1} drift = {held:.3e}")
        assert err == 0.0
        assert held == 0.0
        assert _max_diff(dumps[step + 1]["policy"], dumps[step]["policy"]) > 0  # the policy moved on; the reference did not
    scalars = read_scalars(hard_run / "tensorboard")
    assert scalars["tr/updates"] == [(1, 0.0), (2, 1.0), (3, 1.0), (4, 2.0), (5, 2.0)]
    assert dict(scalars["tr/ref_policy_l2"])[2] == 0.0 and dict(scalars["tr/ref_policy_l2"])[3] > 0


@pytest.mark.slow
def test_anchor_stays_the_initial_model_beside_a_moving_reference(hard_run, initial_weights):
    dumps = _dumps(hard_run)
    for step, record in dumps.items():
        assert record["anchor_is_reference"] is False
        assert _max_diff(record["anchor"], initial_weights) == 0.0, f"step {step}"


def _hf_logps(weights: dict[str, torch.Tensor], ids: list[str]) -> torch.Tensor:
    """Log-probs of the given training examples under a plain HF model holding ``weights``, as [chosen; rejected]."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aligner.data import embedded
    from aligner.data import collate_pairs, load_rows, tokenize_dataset
    from aligner.scoring.logps import batch_logps

    path = embedded.ensure_embedded_model("embedded:tiny-sort")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    model.load_state_dict(weights, strict=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    by_id = {ex.id: ex for ex in tokenize_dataset(load_rows("embedded:train"), tokenizer, 64, None, "error", "train")}
    with torch.no_grad():
        logps, _ = batch_logps(model, collate_pairs([by_id[i] for i in ids], tokenizer.pad_token_id))
    return logps


@pytest.mark.slow
def test_reference_forward_after_an_update_uses_the_new_weights(hard_run, initial_weights):
    dumps = _dumps(hard_run)
    # Step 3's micro-batch is scored by the reference as step 2's update left it (= the policy after step 2).
    (batch,) = dumps[3]["micro_batches"]
    expected = _hf_logps(dumps[2]["reference"], batch["ids"])
    stale = _hf_logps(initial_weights, batch["ids"])
    err = float((batch["reference"] - expected).abs().max())
    print(f"exactness reference forward after tr_hard update: max |logp - HF logp| = {err:.3e}")
    assert err < 1e-4
    assert float((expected - stale).abs().max()) > 1e-2  # a stale (initial) reference would be told apart
    assert float((batch["anchor"] - stale).abs().max()) < 1e-4


@pytest.mark.slow
def test_resuming_a_reference_saved_by_another_world_size_is_refused_naming_the_file(soft_run, tmp_path):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from aligner.training import checkpoint

    folder = tmp_path / "checkpoints" / "step_7"
    shutil.copytree(soft_run / "checkpoints" / "step_7", folder)
    for path in (folder / "tr_soft").glob("*.safetensors"):
        save_file(load_file(path), path, metadata={"world_size": "4", "rank": "0"})
    marker = json.loads((folder / checkpoint.MARKER).read_text())  # the digests a 4-rank run would have recorded,
    marker["files"] = checkpoint.record_files(folder)  # so the checkpoint verifies and the world-size check speaks
    (folder / checkpoint.MARKER).write_text(json.dumps(marker))
    proc = launch(["--config", "configs/tiny-cpu-tr.yaml", *COMMON, f"output_dir={tmp_path}", "train.max_steps=8",
                   f"tr_probe.dump_dir={tmp_path / 'probe'}", "--plugins", SOFT_PLUGINS, "--resume", "auto"])
    assert proc.returncode == 2
    assert "reference_rank00000.safetensors was written by a run with 4 ranks and this run has 2" in proc.stderr
    assert "resume with 4 ranks" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("run,plugins", [("soft_run", SOFT_PLUGINS), ("hard_run", f"ipo,tr_hard,{PROBE}")])
def test_the_estimator_prints_the_plan_the_trust_region_runs_built(run, plugins, request):
    written = check_plan_against_estimate(request.getfixturevalue(run), plugins=plugins)
    reference = written["models"]["reference"]
    assert reference["moves"] and reference["state"] == "live" and reference["dtype"] == "float32"
    assert written["built"]["reference"]["shares"] is None and written["built"].get("anchor", {}).get("shares") is None
