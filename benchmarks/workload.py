"""The benchmark workloads: a random-init Llama, a one-word-per-token tokenizer, and ragged preference pairs.

``CPU`` is the shared CPU yardstick (``../shared/bench/README.md``): a 19.2M-parameter
Llama (hidden 256, 4 layers, 8/2 heads, vocab 32000, untied, fp32) and 512 pairs
whose prompt (16–192) and response (16–448, with EOS) lengths are log-uniform,
so that half of every padded batch of 4 pairs is padding. With the same seed
(1234) this module draws the same random numbers in the same order as the
shared ``make_workload.py`` does, so the rows and the weights are the same
files; it does not need that script, or the shared folder, to exist.

``LONG`` is the same model with long-prompt pairs (prompt 192–640, response 16–256 tokens, log-uniform:
means about 372 and 87, like multi-turn dialogue), where the prompt dominates and prefix sharing pays.

``CUDA`` has Llama-3.2-1B shapes (hidden 2048, 16 layers, 32/8 heads, vocab
128256) and sequences up to 2048 tokens. ``SMOKE`` is a tiny one for tests.

Written under ``out``: ``model/`` (``save_pretrained`` weights and tokenizer) and
``data/prefs.jsonl`` (``{prompt, chosen, rejected}`` rows). One synthetic word is
one token and no BOS is added, so the drawn lengths are the token lengths; the
responses' last token is the EOS that the tokenizer (aligner's, as TRL's) appends.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


@dataclass(frozen=True)
class Workload:
    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    pairs: int
    prompt: tuple[int, int]  #: log-uniform token range of prompts
    response: tuple[int, int]  #: log-uniform token range of responses, EOS included
    max_position: int = 2048
    seed: int = 1234

    @property
    def max_length(self) -> int:
        return self.prompt[1] + self.response[1]


CPU = Workload("cpu", 32000, 256, 4, 8, 2, 704, 512, (16, 192), (16, 448))
LONG = Workload("long", 32000, 256, 4, 8, 2, 704, 512, (192, 640), (16, 256))
CUDA = Workload("cuda", 128256, 2048, 16, 32, 8, 8192, 512, (64, 1024), (64, 1024), max_position=4096)
SMOKE = Workload("smoke", 400, 32, 2, 4, 2, 64, 24, (3, 12), (2, 20), max_position=64)


def describe(spec: Workload) -> str:
    """The drawn lengths' means: log-uniform on [lo, hi] has mean (hi - lo) / ln(hi / lo)."""
    def mean(lo: int, hi: int) -> float:
        return (hi - lo) / math.log(hi / lo)

    return f"prompt mean {mean(*spec.prompt):.0f}, response mean {mean(*spec.response):.0f} tokens"


def _words(n: int, rng: random.Random) -> list[str]:
    """n distinct pronounceable words of 1–4 syllables."""
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    syllables += [s + "n" for s in syllables]
    out, seen = [], set()
    while len(out) < n:
        word = "".join(rng.choice(syllables) for _ in range(rng.choice((1, 2, 2, 3, 3, 4))))
        if word not in seen:
            seen.add(word)
            out.append(word)
    return out


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def rows(spec: Workload, words: list[str], rng: random.Random) -> list[dict[str, str]]:
    """The preference rows: Zipf(1.05)-distributed words, chosen and rejected of different lengths."""
    import numpy as np

    probs = 1.0 / np.arange(1, len(words) + 1) ** 1.05
    probs /= probs.sum()
    draw = np.random.default_rng(spec.seed)

    def text(n: int) -> str:
        return " ".join(words[i] for i in draw.choice(len(words), size=n, p=probs))

    out = []
    for _ in range(spec.pairs):
        p = _log_uniform(rng, *spec.prompt)
        c = _log_uniform(rng, *spec.response)
        r = _log_uniform(rng, *spec.response)
        while r == c:
            r = _log_uniform(rng, *spec.response)
        prompt = text(p)
        chosen = " " + text(c - 1)  # + EOS appended at tokenization
        rejected = " " + text(r - 1)
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def tokenizer(words: list[str], max_length: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({w: i + len(SPECIALS) for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=max_length, padding_side="left")


def model(spec: Workload):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    config = LlamaConfig(vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                         num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                         num_key_value_heads=spec.kv_heads, max_position_embeddings=spec.max_position,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


def ensure(spec: Workload, out: Path) -> Path:
    """Build the workload under ``out`` unless it is there already; returns ``out``."""
    out = Path(out)
    data = out / "data" / "prefs.jsonl"
    if (out / "model" / "config.json").is_file() and data.is_file():
        return out
    rng = random.Random(spec.seed)
    words = _words(spec.vocab - len(SPECIALS), rng)
    pairs = rows(spec, words, rng)
    data.parent.mkdir(parents=True, exist_ok=True)
    with open(data, "w") as f:
        for row in pairs:
            f.write(json.dumps(row) + "\n")
    (out / "model").mkdir(parents=True, exist_ok=True)
    tokenizer(words, spec.max_position).save_pretrained(out / "model")
    model(spec).save_pretrained(out / "model")
    return out
