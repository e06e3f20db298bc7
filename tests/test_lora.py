"""model.lora in-process: config validation, target modules, the adapters-off views, the plan, the estimate,
and the tr_soft rule on adapters (aligner/reference/lora_trust_region.py)."""

import subprocess
import sys

import pytest
import torch

from aligner.config import ConfigError, LoraSection
from aligner.data import embedded
from aligner.models import lora
from aligner.models.plan import make_plan
from aligner.recipes.train import configure, parse_args
from aligner.reference.lora_trust_region import compress, mixed_factors
from aligner.tools.estimate import ModelShape
from conftest import ROOT


def config(*overrides: str, plugins: str = "dpo"):
    return configure(parse_args(["--plugins", plugins, "--set", *overrides]))


@pytest.fixture(scope="module")
def tiny_model(tiny_tokenizer):
    return embedded.build_model(len(tiny_tokenizer), seed=3).eval()


@pytest.mark.parametrize("override, message", [
    ("model.lora.rank=8", "unknown key 'model.lora.rank'; the keys of 'model.lora' are alpha, dropout, modules_to_save, "
                          "r, reference_rank, target_modules"),
    ("model.lora.r=0", "model.lora.r must be >= 1 (the adapters' rank), got 0"),
    ("model.lora.alpha=-1", "model.lora.alpha must be > 0, got -1"),
    ("model.lora.dropout=1", "model.lora.dropout must be in [0, 1), got 1"),
    ("model.lora.target_modules=linear", "model.lora.target_modules must be 'all-linear' or a list of module names"),
    ("model.lora.reference_rank=2", "model.lora.reference_rank must be >= model.lora.r (8), got 2; leave it out for 2·r"),
    ("model.lora=8", "key 'model.lora' expects a mapping of options, got 8"),
])
def test_wrong_lora_keys_and_values_name_the_key_and_the_fix(override, message):
    with pytest.raises(ConfigError) as err:
        config(override)
    assert message in str(err.value)
    assert f"--set {override}" in str(err.value) or "unknown key" in message  # unknown keys name the config file


def test_merge_lora_without_lora_is_refused():
    with pytest.raises(ConfigError, match=r"export.merge_lora: true merges LoRA adapters into the base, but model.lora "
                                          r"is not set .*; set model.lora, or remove export.merge_lora"):
        config("export.merge_lora=true")


@pytest.mark.subprocess
def test_a_wrong_lora_key_exits_2_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--set", f"output_dir={tmp_path}",
                           "model.lora.dropout=1.5"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.lora.dropout must be in [0, 1), got 1.5" in proc.stderr


def test_lora_unset_is_none_and_an_empty_section_takes_the_defaults():
    assert config("train.seed=1")[0].model.lora is None
    section = config("model.lora.r=4")[0].model.lora
    assert (section.r, section.alpha, section.dropout, section.target_modules, section.ref_rank) == (4, 16.0, 0.0, "all-linear", 8)


def test_target_modules_that_match_nothing_list_the_modules_that_exist(tiny_model):
    with pytest.raises(ConfigError) as err:
        lora.wrap(tiny_model, LoraSection(target_modules=["q_prj", "v_proj"]), seed=0)
    assert ("model.lora.target_modules: q_prj match no module of this LlamaForCausalLM; the linear and embedding "
            "modules it has are down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj") in str(err.value)
    with pytest.raises(ConfigError, match=r"model.lora.modules_to_save: head match no module"):
        lora.wrap(tiny_model, LoraSection(modules_to_save=["head"]), seed=0)


def test_the_initial_policy_is_the_base_and_only_its_adapters_train(tiny_model, tiny_tokenizer):
    ids = torch.tensor([tiny_tokenizer.encode("3 1 2 -> 1 2 3")])
    with torch.no_grad():
        base = tiny_model(input_ids=ids).logits
    wrapped = lora.wrap(embedded.build_model(len(tiny_tokenizer), seed=3).eval(), LoraSection(r=4), seed=7,
                        reference_adapter=True)
    with torch.no_grad():
        assert torch.equal(wrapped(input_ids=ids).logits, base)  # B = 0
        with torch.no_grad():
            wrapped.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.fill_(0.1)
        moved = wrapped(input_ids=ids).logits
        assert not torch.equal(moved, base)
        with wrapped.disable_adapter():
            assert torch.equal(wrapped(input_ids=ids).logits, base)
        with lora.active_adapter(wrapped, lora.REFERENCE_ADAPTER):
            assert torch.equal(wrapped(input_ids=ids).logits, base)  # the reference adapter starts at zero
        assert torch.equal(wrapped(input_ids=ids).logits, moved)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n and ".default." in n for n in trainable)
    assert lora.trainable_parameters(wrapped) == ModelShape.from_dict(tiny_model.config.to_dict(), "x").lora_params("all-linear", 4)
    # The adapters' A factors come from the seed alone: the same on every rank.
    again = lora.wrap(embedded.build_model(len(tiny_tokenizer), seed=3), LoraSection(r=4), seed=7)
    a = dict(again.named_parameters())
    assert all(torch.equal(p, a[n]) for n, p in wrapped.named_parameters() if ".default." in n and "lora_A" in n)


def test_the_plan_takes_the_reference_and_the_anchor_from_the_policy_engine():
    cfg, plugins = config("model.lora.r=4", "train.cache_static_logps=false", plugins="dpo,flipguard")
    plan = make_plan(cfg, plugins)
    assert (plan.get("reference").shares, plan.get("reference").adapters) == ("policy", "off")
    assert plan.get("anchor").shares == "reference"  # one adapters-off forward for both
    cfg, plugins = config("model.lora.r=4", "train.cache_static_logps=false", "model.dtype=float32",
                          plugins="dpo,tr_soft,flipguard")
    plan = make_plan(cfg, plugins)
    ref, anchor = plan.get("reference"), plan.get("anchor")
    assert (ref.shares, ref.adapters, ref.moves, ref.dtype) == ("policy", "reference", True, "float32")
    assert (anchor.shares, anchor.adapters) == ("policy", "off")
    cfg, plugins = config("model.lora.r=4", plugins="dpo,flipguard")  # the static cache: as without LoRA
    assert [s.state for s in make_plan(cfg, plugins).frozen()] == ["cached", "cached"]


def test_a_lora_reference_from_another_model_gets_its_own_engine_and_cannot_move(random_model_dir):
    cfg, plugins = config("model.lora.r=4", "train.cache_static_logps=false", f"model.reference_path={random_model_dir}")
    ref = make_plan(cfg, plugins).get("reference")
    assert (ref.source, ref.shares, ref.adapters) == (str(random_model_dir), None, None)
    cfg, plugins = config("model.lora.r=4", f"model.reference_path={random_model_dir}", plugins="dpo,tr_hard")
    with pytest.raises(ConfigError, match=r"under model.lora the moved reference is an adapter on the policy's base"):
        make_plan(cfg, plugins)


def test_modules_to_save_with_a_moved_reference_is_refused(tiny_model):
    with pytest.raises(ConfigError, match=r"modules_to_save cannot be combined with a reference-update plugin"):
        lora.wrap(tiny_model, LoraSection(modules_to_save=["lm_head"]), seed=0, reference_adapter=True)


def _factors(gen, out, rank, inp):
    return torch.randn(out, rank, generator=gen, dtype=torch.float64), torch.randn(rank, inp, generator=gen, dtype=torch.float64)


def test_tr_soft_on_adapters_is_exact_while_the_rank_fits():
    gen = torch.Generator().manual_seed(0)
    B_r, A_r = torch.zeros(24, 8, dtype=torch.float64), torch.zeros(8, 40, dtype=torch.float64)
    dense = torch.zeros(24, 40, dtype=torch.float64)
    for _ in range(2):  # two updates of a rank-4 policy: rank <= 8 = R
        B, A = _factors(gen, 24, 4, 40)
        dense = 0.6 * B @ A + 0.4 * dense
        B_r, A_r = mixed_factors(B, A, B_r, A_r, 0.6)
        assert B_r.shape == (24, 8) and A_r.shape == (8, 40)
        assert torch.allclose(B_r @ A_r, dense, atol=1e-12, rtol=0)


def test_past_the_rank_it_is_the_best_low_rank_approximation():
    gen = torch.Generator().manual_seed(1)
    U, V = _factors(gen, 24, 12, 40)
    B, A = compress(U, V, 8)
    sigma = torch.linalg.svdvals(U @ V)
    # Eckart-Young: the error is exactly the dropped singular values.
    assert torch.allclose(torch.linalg.norm(U @ V - B @ A), sigma[8:].norm(), rtol=1e-10)


def test_tr_hard_on_adapters_copies_the_policy_adapter_exactly():
    gen = torch.Generator().manual_seed(2)
    B, A = _factors(gen, 24, 4, 40)
    B_r, A_r = _factors(gen, 24, 8, 40)
    new_B, new_A = mixed_factors(B, A, B_r, A_r, 1.0)
    assert torch.equal(new_B @ new_A, B @ A) and torch.equal(new_B[:, :4], B) and not new_B[:, 4:].any()
