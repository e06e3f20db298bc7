"""The batch path, decided once (aligner/scoring/batch_path.py): the fast path by default, and every fallback with its reason."""

import pytest

from aligner.config import ConfigError, build_config
from aligner.models import attention
from aligner.scoring.batch_path import BatchPath, decide, head_problem


@pytest.fixture(scope="module")
def llama_config(random_model_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(random_model_dir)


def _decide(llama_config, sets=None, paired=True, kl_pairs=False, cuda=False, kernels=None, model_config=None):
    cfg = build_config(sets or {})
    return decide(cfg, model_config or llama_config, paired, kl_pairs, cuda=cuda, kernels=kernels)


def test_defaults_take_packed_prefix_shared_chunked_on_cpu_and_gpu(llama_config):
    for cuda in (False, True):
        path = _decide(llama_config, cuda=cuda, kernels=[])
        assert (path.packing, path.prefix_sharing, path.chunk_tokens, path.fallbacks) == (True, True, 1024, ())
        assert path.attn_implementation == attention.VARLEN
    assert path.describe() == ("packed + prefix-shared + chunked head (1024 tokens), attention aligner_varlen on "
                               "sdpa_segments, bfloat16")


def test_unpaired_or_kl_pairs_batches_are_padded_with_the_reason(llama_config):
    for kwargs in ({"paired": False}, {"kl_pairs": True}):
        path = _decide(llama_config, **kwargs)
        assert not path.packing and not path.prefix_sharing and path.chunk_tokens == 1024
        assert path.fallbacks == ("padded: unpaired/KTO batches (kl_pairs) are padded",)
        assert path.describe().startswith("padded + chunked head (1024 tokens), attention sdpa, float32 (padded: unpaired")


def test_a_gpu_without_a_varlen_kernel_packs_on_sdpa_per_segment(llama_config):
    path = _decide(llama_config, cuda=True, kernels=[])
    assert path.packing and path.prefix_sharing and path.kernel == "sdpa_segments" and path.dtype == "bfloat16"


def test_attention_named_by_the_user_packs_unshared(llama_config):
    path = _decide(llama_config, {"model": {"attn_implementation": "sdpa"}})
    assert path.packing and not path.prefix_sharing and path.attn_implementation == "sdpa"
    assert "model.attn_implementation=sdpa masks from position ids; use auto or varlen" in path.fallbacks[0]


@pytest.mark.parametrize("key,value", [("final_logit_softcapping", 30.0), ("logit_scale", 0.5)])
def test_a_model_that_transforms_its_logits_is_scored_with_full_logits(llama_config, key, value):
    changed = llama_config.__class__.from_dict({**llama_config.to_dict(), key: value})
    path = _decide(llama_config, model_config=changed)
    assert path.chunk_tokens == 0 and path.packing and path.prefix_sharing
    assert path.fallbacks == (f"full logits: config.{key}={value} transforms the logits after the LM head",)


def test_a_plain_linear_head_is_read_from_the_meta_device_model(llama_config):
    assert head_problem(llama_config) is None


def test_switches_turned_off_are_not_fallbacks_and_apply_resolves_the_config(llama_config):
    sets = {"train": {"packing": False, "logps_chunk_tokens": 0}}
    path = _decide(llama_config, sets)
    assert path == BatchPath(False, False, 0, "sdpa", "sdpa", "float32", ())
    cfg = path.apply(build_config(sets))
    assert cfg.model.attn_implementation == "sdpa" and not cfg.train.packing and not cfg.train.prefix_sharing
    assert cfg.model.dtype == "float32"  # model.dtype: auto, resolved for this CPU run
    shared = _decide(llama_config).apply(build_config({}))
    assert shared.model.attn_implementation == "varlen" and shared.train.prefix_sharing
    assert attention.attn_implementation(shared.model.attn_implementation, True) == attention.VARLEN


@pytest.mark.parametrize("key", ["prefix_sharing", "balance_ranks"])
def test_wrong_switch_values_are_config_errors_naming_the_key(key):
    with pytest.raises(ConfigError, match=rf"key 'train.{key}' expects true or false, got 'sometimes'"):
        build_config({"train": {key: "sometimes"}})

