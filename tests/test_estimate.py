"""aligner-estimate: model states against DeepSpeed's own ZeRO-3 estimator, the models each plugin set builds,
activations, and bad inputs."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from aligner.recipes.train import configure
from aligner.tools import estimate
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

LLAMA3_8B = estimate.ModelShape.from_dict(estimate.BUILTIN_SHAPES["llama3-8b"], "llama3-8b")
FIXTURES = "plugin_fixtures.memory"


def cfg_and_plugins(config: str, plugins: str, *overrides: str):
    cfg, active = configure(argparse.Namespace(config=config, plugins=plugins, overrides=[list(overrides)] if overrides else []))
    # Live frozen engines unless a test turns the static log-prob cache (train.cache_static_logps) on.
    cfg.train.cache_static_logps = False
    return cfg, active


def test_llama3_8b_shape_counts_like_transformers_and_deepspeed():
    import torch
    from deepspeed.runtime.zero.stage3 import model_to_params
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = {k: v for k, v in estimate.BUILTIN_SHAPES["llama3-8b"].items() if k != "model_type"}
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**conf))
    _, largest = model_to_params(model)  # its total de-duplicates by data_ptr, which is 0 for every meta tensor
    total = sum(p.numel() for p in model.parameters())
    assert LLAMA3_8B.num_params() == total == 8_030_261_248  # Meta-Llama-3-8B's parameter count
    assert LLAMA3_8B.largest_layer_params() == largest


@pytest.mark.parametrize("gpus,nodes", [(8, 1), (8, 2), (1, 1)])
@pytest.mark.parametrize("offload", [False, True])
def test_model_states_agree_with_deepspeeds_zero3_estimator(gpus, nodes, offload):
    cfg, plugins = cfg_and_plugins("configs/llama3-8b-zero3.yaml", "dpo", f"train.offload_optimizer={str(offload).lower()}")
    est = estimate.estimate(cfg, plugins, LLAMA3_8B, gpus, nodes)
    ds_cpu_per_node, ds_gpu = estimate.deepspeed_model_states(
        LLAMA3_8B.num_params(), LLAMA3_8B.largest_layer_params(), gpus, nodes, offload)
    # DeepSpeed: 4 bytes x the largest layer (gathered for compute) + model states per GPU; we count the
    # gathered parameters separately, from the DeepSpeed config.
    states = est.model_states()
    on_gpu = sum(b for name, b in states.items() if any(line.name == name for line in est.steady))
    assert on_gpu == pytest.approx(ds_gpu - 4 * LLAMA3_8B.largest_layer_params(), rel=1e-3)
    if offload:
        assert set(states) == {"policy params", "policy fp32 gradients", "policy fp32 master", "policy Adam moments"}
        # DeepSpeed's host figure is per node, with a 1.5 buffer factor on top of the 16 bytes per parameter.
        assert est.host_per_node * 1.5 == pytest.approx(ds_cpu_per_node, rel=1e-3)
    else:
        assert not est.host


def test_dpo_builds_policy_and_reference():
    cfg, plugins = cfg_and_plugins("configs/tiny-cpu.yaml", "dpo")
    assert [(f.role, f.cached) for f in estimate.planned_frozen_models(cfg, plugins)] == [("reference", False)]


def test_a_reference_free_loss_builds_the_policy_only(tmp_path):
    (tmp_path / "run.yaml").write_text("model:\n  name_or_path: embedded:tiny-random\ntrain:\n  micro_batch_size: 2\n")
    cfg, plugins = cfg_and_plugins(str(tmp_path / "run.yaml"), f"{FIXTURES}:ref_free")
    est = estimate.estimate(cfg, plugins, LLAMA3_8B, 8)
    assert est.frozen == []
    assert not any(line.name.startswith(("reference", "anchor", "frozen")) for line in est.steady)


def test_anchor_equal_to_reference_without_a_reference_update_is_one_engine():
    cfg, plugins = cfg_and_plugins("configs/tiny-cpu.yaml", f"dpo,{FIXTURES}:anchor_pull")
    est = estimate.estimate(cfg, plugins, LLAMA3_8B, 8)
    assert [f.role for f in est.frozen] == ["reference+anchor"]
    assert [line.name for line in est.steady if line.name.endswith(" params") and "gathered" not in line.name
                                 and not line.name.startswith("policy")] == [
        "reference+anchor params"]


def test_a_moved_reference_is_a_separate_fp32_engine_beside_the_anchor():
    cfg, plugins = cfg_and_plugins("configs/llama3-8b-zero3.yaml", f"dpo,{FIXTURES}:anchor_pull,{FIXTURES}:moves_reference")
    est = estimate.estimate(cfg, plugins, LLAMA3_8B, 8)
    assert [(f.role, f.dtype) for f in est.frozen] == [("reference", "float32"), ("anchor", "bfloat16")]
    lines = {line.name: line.bytes for line in est.steady}
    assert lines["reference params"] == pytest.approx(2 * lines["anchor params"])


def test_a_different_reference_checkpoint_is_a_second_engine(tmp_path):
    cfg, plugins = cfg_and_plugins("configs/tiny-cpu.yaml", f"dpo,{FIXTURES}:anchor_pull", f"model.reference_path={tmp_path}")
    assert [f.role for f in estimate.planned_frozen_models(cfg, plugins)] == ["reference", "anchor"]


def test_static_caches_replace_frozen_engines_after_a_prepass():
    cfg, plugins = cfg_and_plugins("configs/llama3-8b-zero3.yaml", f"dpo,{FIXTURES}:anchor_pull")
    live = estimate.estimate(cfg, plugins, LLAMA3_8B, 8)
    cfg.train.cache_static_logps = True  # the key of the static log-prob cache (train.cache_static_logps)
    cached = estimate.estimate(cfg, plugins, LLAMA3_8B, 8)
    assert [f.cached for f in cached.frozen] == [True]
    assert "reference+anchor params" not in {line.name for line in cached.steady}
    assert {line.name for line in cached.prepass} >= {"reference+anchor params", "reference+anchor forward (pre-pass)"}
    assert cached.steady_total < live.steady_total
    assert 0 < cached.prepass_total < cached.steady_total and cached.peak == cached.steady_total


def test_gradient_checkpointing_and_eager_attention_change_activations():
    def activations(*overrides):
        cfg, plugins = cfg_and_plugins("configs/llama3-8b-zero3.yaml", "dpo", *overrides)
        return {line.name: line.bytes for line in estimate.estimate(cfg, plugins, LLAMA3_8B, 8).steady}["policy activations"]

    with_gc, without = activations(), activations("model.gradient_checkpointing=false")
    tokens = 2 * 2 * 2048  # chosen + rejected x micro-batch 2 x max_length
    assert without == 32 * tokens * LLAMA3_8B.activation_elems_per_token_layer() * 2
    assert with_gc == 32 * tokens * 4096 * 2 + tokens * LLAMA3_8B.activation_elems_per_token_layer() * 2
    eager = activations("model.gradient_checkpointing=false", "model.attn_implementation=eager")
    assert eager - without == 32 * 2 * 32 * 2048**2 * 4 * 2  # scores + probabilities per head, 4 sequences, bf16


def run_cli(capsys, *args):
    code = estimate.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_the_breakdown_and_whether_it_fits(capsys):
    code, out, err = run_cli(capsys, "--config", "configs/llama3-8b-zero3-offload.yaml", "--gpus", "8", "--model-config", "llama3-8b")
    assert code == 0, err
    assert "8.030B params" in out and "host per node (8 ranks)" in out and "-> fits" in out
    assert "per-process overhead" in out
    code, out, err = run_cli(capsys, "--config", "configs/llama3-8b-zero3.yaml", "--gpus", "1", "--model-config", "llama3-8b", "--json")
    report = json.loads(out)
    assert report["fits"] is False and report["peak_gib"] > 80


@pytest.mark.subprocess
def test_console_script_says_when_a_run_does_not_fit():
    exe = Path(sys.executable).with_name("aligner-estimate")
    proc = subprocess.run([str(exe), "--config", "configs/llama3-8b-zero3.yaml", "--gpus", "1", "--model-config", "llama3-8b"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "does NOT fit (short by" in proc.stdout


def test_shape_read_from_a_checkpoint_config(random_model_dir):
    cfg, plugins = cfg_and_plugins("configs/tiny-cpu.yaml", "dpo", f"model.name_or_path={random_model_dir}")
    shape, source = estimate.load_shape(None, cfg.model.name_or_path)
    config = json.loads((random_model_dir / "config.json").read_text())
    assert source.endswith("config.json") and shape.hidden_size == config["hidden_size"]


@pytest.mark.parametrize("args,message", [
    (["--config", "nowhere.yaml"], "--config nowhere.yaml: no such file"),
    (["--config", "configs/tiny-cpu.yaml", "--plugins", "no_such_plugin"], "unknown plugin 'no_such_plugin'"),
    (["--config", "configs/tiny-cpu.yaml", "--model-config", "missing/config.json"],
     "--model-config: missing/config.json has no config.json; give a checkpoint folder, a config.json, or a built-in shape"),
    (["--config", "configs/tiny-cpu.yaml", "--model-config", "llama3-8b", "--gpus", "0"], "--gpus and --nodes must be >= 1"),
    (["--config", "configs/tiny-cpu.yaml", "--model-config", "llama3-8b", "--set", "train.no_such_key=1"],
     "unknown key 'train.no_such_key'"),
])
def test_bad_inputs_are_clear_errors(capsys, args, message):
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert message in err, err


def test_a_config_json_without_llama_keys_is_a_clear_error(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    code, _, err = run_cli(capsys, "--config", "configs/tiny-cpu.yaml", "--model-config", str(tmp_path))
    assert code == 2
    assert "no vocab_size, intermediate_size, num_hidden_layers, num_attention_heads" in err


@pytest.mark.subprocess
def test_scale_8b_script_parses_and_its_estimate_helpers_run(tmp_path, capsys):
    import scale_8b

    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "scale_8b.sh")]).returncode == 0
    assert scale_8b.chosen_plugins() in ("dpo", "tr_soft,flipguard")
    sets = ["train.micro_batch_size=1", "train.grad_accum=1", "data.eval=null"]
    layers = scale_8b.fit_layers("configs/llama3-8b-zero3-offload.yaml", "dpo", 78.0, 110.0, sets)
    assert 1 <= layers < 32  # 8B with offload needs ~120 GiB of host memory
    one = scale_8b.estimate_for("configs/llama3-8b-zero3-offload.yaml", "dpo", layers, 1, sets)
    more = scale_8b.estimate_for("configs/llama3-8b-zero3-offload.yaml", "dpo", layers + 1, 1, sets)
    assert one.peak <= 78 * estimate.GIB and one.host_per_node + one.overhead <= 110 * estimate.GIB
    assert more.peak > 78 * estimate.GIB or more.host_per_node + more.overhead > 110 * estimate.GIB
    scale_8b.write_data(tmp_path / "pairs.jsonl", pairs=3, tokens=256)
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["prompt"]) >= 128 and r["chosen"] != r["rejected"] for r in rows)


def test_kto_with_the_cache_on_keeps_a_live_reference_as_training_does():
    cfg, plugins = cfg_and_plugins("configs/tiny-cpu.yaml", "kto")
    cfg.train.cache_static_logps = True  # the default; the mismatched pairs need the reference every step
    assert [(f.role, f.cached) for f in estimate.planned_frozen_models(cfg, plugins)] == [("reference", False)]
    assert estimate.estimate(cfg, plugins, LLAMA3_8B, 8).plan.needs("kl_pairs")


def test_unpaired_training_data_turns_the_cache_off_in_the_printed_plan(tmp_path, capsys):
    data = tmp_path / "unpaired.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b", "label": True}) + "\n")
    code, out, err = run_cli(capsys, "--config", "configs/tiny-cpu.yaml", "--plugins", "kto,flipguard", "--json",
                             "--model-config", "llama3-8b", "--set", f"data.train={data}")
    assert code == 0, err
    report = json.loads(out)
    assert report["data_paired"] is False
    assert {n: m["state"] for n, m in report["plan"]["models"].items()} == {"policy": "trained", "reference": "live",
                                                                            "anchor": "live"}


def test_chunked_log_probs_shrink_the_logits_lines():
    def lines(*overrides):
        cfg, plugins = cfg_and_plugins("configs/llama3-8b-zero3.yaml", "dpo", *overrides)
        return {line.name: line.bytes for line in estimate.estimate(cfg, plugins, LLAMA3_8B, 8).steady}

    naive, chunked = lines("train.logps_chunk_tokens=0"), lines("train.logps_chunk_tokens=1024")  # 1024: the default
    tokens = 2 * 2 * 2048
    assert naive["policy logits"] == tokens * 128256 * (2 * 2 + 4)
    # One (1024, V) fp32 chunk and its bf16 copy in the backward pass, plus the hidden states it is computed from.
    assert chunked["policy logits"] == 1024 * 128256 * (4 + 2) + tokens * 4096 * 2
    assert chunked["frozen forward (transient)"] < naive["frozen forward (transient)"]


@pytest.mark.parametrize("config", sorted(str(p) for p in Path("configs").glob("llama3-8b-*.yaml")))
def test_every_8b_config_estimates_any_loss_and_prints_the_batch_path_the_run_takes(capsys, config):
    code, out, err = run_cli(capsys, "--config", config, "--plugins", "kto", "--gpus", "8", "--model-config", "llama3-8b")
    assert code == 0, err  # the configs carry no section of one loss plugin
    line = next(text for text in out.splitlines() if text.startswith("batch path: "))
    if "sequence parallel" in out:  # under SP unpaired batches are packed and sharded too
        assert line.startswith("batch path: packed + chunked head"), line
    else:
        assert line.startswith("batch path: padded") and "unpaired/KTO batches (kl_pairs) are padded" in line
    code, out, err = run_cli(capsys, "--config", config, "--plugins", "dpo", "--gpus", "8", "--model-config", "llama3-8b",
                             "--json")
    path = json.loads(out)["batch_path"]
    assert (path["packing"], path["dtype"]) == (True, "bfloat16")
    assert path["kernel"] == "the kernel the start-up self-check picks"  # not run here: no GPU kernel is tried


def test_the_estimate_counts_the_path_the_run_falls_back_to(capsys, tmp_path):
    conf = dict(estimate.BUILTIN_SHAPES["llama3-8b"], final_logit_softcapping=30.0)  # logits changed after the head
    (tmp_path / "config.json").write_text(json.dumps(conf))
    args = ("--config", "configs/llama3-8b-zero3.yaml", "--gpus", "8", "--plugins", "dpo", "--json")
    chunked = json.loads(run_cli(capsys, *args, "--model-config", "llama3-8b")[1])
    full = json.loads(run_cli(capsys, *args, "--model-config", str(tmp_path / "config.json"))[1])
    assert chunked["batch_path"]["chunk_tokens"] == 1024 and full["batch_path"]["chunk_tokens"] == 0
    assert "full logits: config.final_logit_softcapping=30.0" in full["batch_path"]["fallbacks"][0]
    assert full["steady_total_gib"] > chunked["steady_total_gib"] + 1  # (T, V) logits of 2 x 2 x 2048 tokens
    cpu = json.loads(run_cli(capsys, *args, "--model-config", "llama3-8b", "--device", "cpu")[1])
    assert cpu["batch_path"]["kernel"] == "sdpa_segments"  # ranks on the CPU: SDPA per segment, no GPU kernel


@pytest.mark.parametrize("model_type", [None, "mycorp_llm"])
def test_a_bare_shape_without_a_model_type_transformers_knows_still_estimates(capsys, tmp_path, model_type):
    conf = {k: v for k, v in estimate.BUILTIN_SHAPES["llama3-8b"].items() if k != "model_type"}
    if model_type:
        conf["model_type"] = model_type
    (tmp_path / "config.json").write_text(json.dumps(conf))
    code, out, err = run_cli(capsys, "--config", "configs/llama3-8b-zero3.yaml", "--gpus", "8", "--plugins", "dpo",
                             "--model-config", str(tmp_path / "config.json"), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["params"] == estimate.load_shape("llama3-8b", "")[0].num_params()
    assert report["batch_path"]["packing"] and report["batch_path"]["chunk_tokens"] == 1024
