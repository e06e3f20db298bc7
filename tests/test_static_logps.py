"""The static log-prob cache, in one process on a real tiny Llama: computed once, reused, refused when stale or corrupt."""

import json
import shutil

import pytest
import torch

from aligner.data import embedded
from aligner.data import collate_pairs, load_rows, tokenize_dataset
from aligner.scoring import static_logps
from aligner.scoring.logps import batch_logps
from aligner.scoring.static_logps import StaticCacheError


def examples(tokenizer):
    rows = load_rows("embedded:eval").select(range(20))
    return tokenize_dataset(rows, tokenizer, 64, None, "error", "eval")


class CountingBuilder:
    """Builds the real model (as the run builds its frozen engine) and counts how often it is asked to."""

    def __init__(self):
        self.calls = 0

    def __call__(self, path):
        from transformers import AutoModelForCausalLM

        self.calls += 1
        return AutoModelForCausalLM.from_pretrained(path).eval()


#: A padded float32 run's scoring (aligner.recipes.train.scoring); the tests change one key of it.
SCORING = {"packing": False, "prefix_sharing": False, "chunk_tokens": 0, "attn_implementation": "sdpa",
           "kernel": "sdpa", "dtype": "float32", "sequence_parallel": 1}


def prepare(model_dir, splits, out, build, scoring=None):
    return static_logps.prepare({"reference": model_dir, "anchor": model_dir}, splits, out, scoring or SCORING,
                                batch_size=6, pad_token_id=0, build_engine=build)


@pytest.fixture()
def model_dir(random_model_dir, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(random_model_dir, path)
    return path


def test_cache_is_computed_once_then_reused_and_equals_a_fresh_forward(model_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    exs = examples(tiny_tokenizer)
    splits = {"train": exs[:14], "eval": exs[14:]}
    build = CountingBuilder()
    caches = prepare(model_dir, splits, tmp_path / "run", build)
    assert build.calls == 1 and caches["reference"] is caches["anchor"]  # same weights: one pre-pass, one cache
    again = prepare(model_dir, splits, tmp_path / "run", build)
    assert build.calls == 1  # complete cache on disk: no engine built
    history = json.loads((tmp_path / "run/static_logps/anchor+reference.json").read_text())
    assert history["passes"] == [{"computed": 20, "reused": 0, "engine_released": True}, {"computed": 0, "reused": 20}]

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for split, part in splits.items():
        cached = again["anchor"].split(split).logps([ex.id for ex in part])
        assert torch.equal(cached.chosen, caches["anchor"].split(split).logps([ex.id for ex in part]).chosen)
        for i, ex in enumerate(part):  # one example at a time: no padding at all
            with torch.no_grad():
                fresh, _ = batch_logps(model, collate_pairs([ex], tiny_tokenizer.pad_token_id))
            assert abs(float(cached.chosen[i]) - float(fresh[0])) < 1e-5
            assert abs(float(cached.rejected[i]) - float(fresh[1])) < 1e-5


def test_stale_and_corrupt_caches_are_refused(model_dir, tiny_tokenizer, tmp_path):
    exs = examples(tiny_tokenizer)
    splits = {"train": exs[:14], "eval": exs[14:]}
    out = tmp_path / "run"
    prepare(model_dir, splits, out, CountingBuilder())
    cache_file = out / "static_logps/anchor+reference.pt"

    edited = examples(tiny_tokenizer)[:14]
    edited[3].chosen_ids = edited[3].chosen_ids[:-1]  # same id, other tokens (as a shorter data.max_length gives)
    with pytest.raises(StaticCacheError, match="is stale: train example .* was cached with other tokens"):
        prepare(model_dir, {"train": edited}, out, CountingBuilder())

    packed = SCORING | {"packing": True, "chunk_tokens": 1024}  # the same weights in another batch layout
    with pytest.raises(StaticCacheError, match=r"is stale: it was scored otherwise \(chunk_tokens 0 -> 1024, "
                                               r"packing False -> True\)"):
        prepare(model_dir, splits, out, CountingBuilder(), packed)

    embedded.build_model(len(tiny_tokenizer), seed=4).save_pretrained(model_dir)  # other weights, same folder
    with pytest.raises(StaticCacheError, match="is stale: it was computed for other weights than") as info:
        prepare(model_dir, splits, out, CountingBuilder())
    assert str(cache_file) in str(info.value) and "delete" in str(info.value)

    cache_file.write_bytes(cache_file.read_bytes()[:100])  # truncated
    with pytest.raises(StaticCacheError, match="is corrupt") as info:
        prepare(model_dir, splits, out, CountingBuilder())
    assert str(cache_file) in str(info.value) and "train.cache_static_logps=false" in str(info.value)
