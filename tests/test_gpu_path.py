"""The GPU path, run on the CPU: the kernel choice and its self-check, the dtype rule, and each layout through
``decide`` on stand-ins of the GPU kernels (tests/kernel_standins.py), against the CPU path."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from aligner.config import ConfigError, build_config
from aligner.data import Example, collate_pairs, pack_pairs, pack_prefix_shared
from aligner.models import attention, loading
from aligner.scoring.batch_path import decide, resolve_dtype
from aligner.scoring.logps import batch_logps
from aligner.training import nonfinite
from kernel_standins import FLASH, TORCH_2_9, TORCH_2_10, TORCH_2_12, top_left_flash_standin

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _restore_kernel():
    yield
    attention.activate(attention.SDPA_SEGMENTS.name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (8, 1)])
def test_the_flash_standin_and_torch_2_12_pass_the_self_check_with_gqa_and_a_window(dtype, heads, kv_heads):
    for kernel in (FLASH, TORCH_2_12):
        assert attention.self_check(kernel, dtype, heads, kv_heads, 16, CPU) is None, kernel.name
        assert attention.self_check(kernel, dtype, heads, kv_heads, 16, CPU, window=3) is None, kernel.name


def test_torch_2_10s_signature_serves_gqa_by_repeating_kv_heads_and_2_9s_is_passed_over():
    with_gqa_flag, repeating = TORCH_2_10
    assert "enable_gqa" in attention.self_check(with_gqa_flag, torch.bfloat16, 4, 2, 16, CPU)
    assert attention.self_check(with_gqa_flag, torch.bfloat16, 4, 4, 16, CPU) is None  # MHA: no flag passed
    assert attention.self_check(repeating, torch.bfloat16, 4, 2, 16, CPU) is None
    kernel, reasons = attention.choose_kernel(torch.bfloat16, 4, 2, 16, None, candidates=TORCH_2_9, device=CPU)
    assert kernel is attention.SDPA_SEGMENTS
    assert all("TypeError" in r and "scale" in r for r in reasons), reasons  # torch 2.9 takes no scale/window


def test_kernels_that_take_half_precision_only_are_passed_over_for_fp32_with_the_reason():
    kernel, reasons = attention.choose_kernel(torch.float32, 4, 2, 16, None, candidates=[FLASH, TORCH_2_12], device=CPU)
    assert kernel is attention.SDPA_SEGMENTS
    assert reasons == ["flash_attn_standin: takes float16/bfloat16 only, the run is float32",
                       "torch_2_12_standin: takes float16/bfloat16 only, the run is float32"]


def test_a_kernel_with_top_left_causal_alignment_fails_the_self_check():
    """flash-attn < 2.1 aligned causal masks top-left when lq != lk: rejected tokens would not see the prompt."""
    wrong = attention._flash_attn_kernel(top_left_flash_standin)
    problem = attention.self_check(wrong, torch.bfloat16, 4, 2, 16, CPU)
    assert problem is not None and problem.startswith("output differs from fp32 SDPA by")
    kernel, reasons = attention.choose_kernel(torch.bfloat16, 4, 2, 16, None, candidates=[wrong, FLASH], device=CPU)
    assert kernel is FLASH and reasons[0].startswith("flash_attn: output differs")


def test_a_flash_attn_that_fails_to_import_falls_back_with_its_error(tmp_path, monkeypatch):
    """The most common flash-attn failure: a wheel built for another torch. Its import error is the reason."""
    package = tmp_path / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text(
        'raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEa")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    found, missing = attention.detect_kernels()
    assert [k.name for k in found] == ["torch_varlen", "torch_varlen_kv_repeat"]
    assert missing == ["flash-attn does not import: ImportError: flash_attn_2_cuda.so: undefined symbol: "
                       "_ZN3c104cuda9SetDeviceEa"]


def test_model_dtype_auto_is_bf16_on_a_gpu_and_fp32_on_the_cpu():
    assert build_config({}).model.dtype == "auto"
    assert resolve_dtype("auto", cuda=False) == "float32"
    assert resolve_dtype("auto", cuda=True) == "bfloat16"  # (no GPU here to ask for its bf16 support)
    assert resolve_dtype("float32", cuda=True) == "float32"
    with pytest.raises(ConfigError, match="model.dtype must be one of auto, float32, bfloat16"):
        build_config({"model": {"dtype": "fp8"}})


@pytest.fixture(scope="module")
def llama_config(random_model_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(random_model_dir)


def test_decide_picks_the_kernel_on_a_gpu_and_says_what_it_passed_over(llama_config):
    bf16 = decide(build_config({}), llama_config, True, False, cuda=True, kernels=[TORCH_2_10[0], FLASH])
    assert (bf16.dtype, bf16.kernel, bf16.attn_implementation) == ("bfloat16", "flash_attn_standin", attention.VARLEN)
    assert bf16.kernel_fallbacks[0].startswith("torch_2_10_gqaTrue: TypeError")
    assert bf16.describe().startswith("packed + prefix-shared + chunked head (1024 tokens), attention aligner_varlen "
                                      "on flash_attn_standin, bfloat16 (kernel torch_2_10_gqaTrue: TypeError")
    fp32 = decide(build_config({"model": {"dtype": "float32"}}), llama_config, True, False, cuda=True, kernels=[FLASH])
    assert (fp32.kernel, fp32.kernel_fallbacks) == ("sdpa_segments", ("flash_attn_standin: takes float16/bfloat16 "
                                                                      "only, the run is float32",))
    cpu = decide(build_config({}), llama_config, True, False, cuda=False)
    assert (cpu.dtype, cpu.kernel, cpu.kernel_fallbacks) == ("float32", "sdpa_segments", ())
    assert bf16.to_dict()["kernel"] == "flash_attn_standin" and fp32.to_dict()["kernel_fallbacks"]


def test_flash_attention_2_named_with_fp32_weights_is_refused_before_any_engine(llama_config):
    cfg = build_config({"model": {"attn_implementation": "flash_attention_2", "dtype": "float32"}})
    with pytest.raises(ConfigError, match=r"model.attn_implementation=flash_attention_2 takes fp16/bf16 weights only, "
                                          r"and model.dtype is float32; set model.dtype: bfloat16"):
        decide(cfg, llama_config, True, False, cuda=True)


def test_a_model_that_soft_caps_attention_runs_padded_with_eager_attention_or_is_refused(llama_config):
    capped = llama_config.__class__.from_dict({**llama_config.to_dict(), "attn_logit_softcapping": 50.0})
    path = decide(build_config({}), capped, True, False, cuda=False)
    assert (path.packing, path.attn_implementation) == (False, "eager")
    assert path.fallbacks == ("padded: config.attn_logit_softcapping=50.0 needs eager attention",)
    with pytest.raises(ConfigError, match="model.attn_implementation=varlen: this model soft-caps its attention logits"):
        decide(build_config({"model": {"attn_implementation": "varlen"}}), capped, True, False, cuda=False)


# -- each layout through decide, on the stand-in and on the CPU path -------------------------------------------------

@pytest.fixture(scope="module")
def examples():
    g = torch.Generator().manual_seed(11)

    def ids(n):
        return torch.randint(3, 200, (n,), generator=g).tolist()

    return [Example("a", ids(6), ids(3), ids(8)), Example("b", [], ids(7), ids(2)), Example("c", ids(19), ids(5), ids(9))]


LAYOUTS = {"padded": ({"packing": False}, lambda exs: collate_pairs(exs, 0)),
           "packed": ({"prefix_sharing": False}, pack_pairs),
           "prefix-shared": ({}, pack_prefix_shared)}


def _run(path_dir, llama_config, dtype: str, layout: str, cuda: bool, weights: str | None = None):
    """decide -> apply -> load_model (the run's own loading) -> log-probs and every parameter's gradient."""
    train, collate = LAYOUTS[layout]
    cfg = build_config({"model": {"dtype": dtype}, "train": {**train, "logps_chunk_tokens": 0}})
    path = decide(cfg, llama_config, True, False, cuda=cuda, kernels=[FLASH])
    cfg = path.apply(cfg)
    model = loading.load_model(path_dir, cfg, weights)
    return path, model, collate


def _logps_and_grads(model, batch):
    model.zero_grad()
    logps, _ = batch_logps(model, batch)
    (logps * torch.linspace(-1, 1, logps.shape[0])).sum().backward()
    return logps.detach().float(), torch.cat([p.grad.float().flatten() for p in model.parameters()])


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype,atol", [("float32", 1e-5), ("bfloat16", 0.25)])
def test_each_layout_on_the_gpu_branch_matches_the_cpu_path(random_model_dir, llama_config, examples, layout, dtype, atol):
    """bf16: the stand-in computes in fp32, the CPU path's SDPA in bf16; summed log-probs agree to 0.25 nats
    (measured up to 0.06) and gradients to 2% of their largest entry. fp32 takes SDPA per segment on both."""
    gpu_path, gpu_model, collate = _run(random_model_dir, llama_config, dtype, layout, cuda=True)
    want_kernel = ("sdpa" if layout == "padded" else "flash_attn_standin" if dtype == "bfloat16" else "sdpa_segments")
    assert gpu_path.kernel == want_kernel
    got, g_got = _logps_and_grads(gpu_model, collate(examples))
    _, cpu_model, _ = _run(random_model_dir, llama_config, dtype, layout, cuda=False)
    want, g_want = _logps_and_grads(cpu_model, collate(examples))
    assert torch.allclose(got, want, atol=atol, rtol=0), (got - want).abs().max()
    assert (g_got - g_want).abs().max() <= (1e-4 if dtype == "float32" else 0.02) * g_want.abs().max()


@pytest.mark.parametrize("layout", ["packed", "prefix-shared"])
def test_a_moved_fp32_reference_in_a_bf16_run_runs_on_the_half_precision_kernel_under_autocast(
        random_model_dir, llama_config, examples, layout):
    """Its weights stay fp32 (exact trust-region mixing); the stand-in refuses fp32, so its forward must be cast."""
    _, fp32_model, collate = _run(random_model_dir, llama_config, "float32", layout, cuda=False)
    _, reference, _ = _run(random_model_dir, llama_config, "bfloat16", layout, cuda=True, weights="float32")
    assert next(reference.parameters()).dtype == torch.float32 and attention.active_kernel() is FLASH
    with torch.no_grad():
        got, _ = batch_logps(reference, collate(examples))
        attention.activate(attention.SDPA_SEGMENTS.name)
        want, _ = batch_logps(fp32_model, collate(examples))
        attention.activate(FLASH.name)
    assert torch.allclose(got, want, atol=0.25, rtol=0), (got - want).abs().max()
    reference.forward = reference.forward.__wrapped__  # without the autocast the kernel refuses the fp32 q/k/v
    with pytest.raises(ValueError, match=r"flash_attn_standin kernel takes .* runs in torch.float32 outside autocast"):
        batch_logps(reference, collate(examples))


def test_a_sliding_window_reaches_the_packed_kernels(tmp_path, examples):
    """Mistral with sliding_window=4: packed log-probs on SDPA per segment and on the flash stand-in equal the
    padded SDPA ones, where transformers' own mask applies the window (the old packed path ignored it)."""
    from transformers import AutoModelForCausalLM, MistralConfig

    torch.manual_seed(2)
    config = MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4, max_position_embeddings=128)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    padded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    varlen = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=attention.register())
    with torch.no_grad():
        want, _ = batch_logps(padded, collate_pairs(examples, 0))
        unwindowed = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa", sliding_window=None)
        assert not torch.allclose(batch_logps(unwindowed, collate_pairs(examples, 0))[0], want, atol=1e-3)
        for layout in (pack_pairs, pack_prefix_shared):
            got, _ = batch_logps(varlen, layout(examples))
            assert torch.allclose(got, want, atol=1e-5), (layout.__name__, (got - want).abs().max())
        attention.activate(attention.register_kernel(FLASH).name)
        bf16 = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=attention.VARLEN, dtype=torch.bfloat16)
        got, _ = batch_logps(bf16, pack_prefix_shared(examples))
    assert torch.allclose(got.float(), want, atol=0.25), (got - want).abs().max()


def test_the_gradient_check_allocates_nothing_the_size_of_the_gradients():
    """A bool mask of an 8B model's gradient partition on one GPU would be 7.5 GiB (1 byte per element)."""
    from torch.profiler import ProfilerActivity, profile

    for dtype in (torch.float32, torch.bfloat16):
        grads = torch.randn(4_000_000).to(dtype)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            assert nonfinite.all_finite([grads, torch.zeros(0)])
        assert max(e.cpu_memory_usage for e in prof.events()) < 1024, dtype
        grads[7] = float("inf")
        assert not nonfinite.all_finite([torch.ones(3), grads])


def test_an_offloaded_optimizer_steps_on_deepspeed_cpu_adam_where_its_op_loads():
    offload = build_config({"train": {"offload_optimizer": True}})
    fast, slow = loading.deepspeed_config(offload, cpu_adam=True), loading.deepspeed_config(offload, cpu_adam=False)
    assert (fast["optimizer"]["params"]["torch_adam"], fast["zero_force_ds_cpu_optimizer"]) == (False, True)
    assert (slow["optimizer"]["params"]["torch_adam"], slow["zero_force_ds_cpu_optimizer"]) == (True, False)
    on_gpu = loading.deepspeed_config(build_config({}), cpu_adam=True)  # not offloaded: torch's AdamW on the device
    assert on_gpu["optimizer"]["params"]["torch_adam"] is True


@pytest.mark.subprocess
def test_a_cpu_adam_op_that_cannot_build_is_the_reason_for_the_fallback(tmp_path):
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "CXX": str(tmp_path / "no-compiler")}
    proc = subprocess.run([sys.executable, "-c", "from aligner.models.loading import host_adam_problem; print(host_adam_problem())"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert ("DeepSpeed's cpu_adam op does not build: RuntimeError: Error building extension 'cpu_adam'"
            in proc.stdout.strip().splitlines()[-1]), proc.stdout + proc.stderr  # (DeepSpeed prints its accelerator first)
