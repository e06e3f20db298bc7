"""The embedded tiny model: a random Llama with a byte-level tokenizer, made locally.

``embedded:tiny-random`` is the bare random model. ``embedded:tiny-sort`` is
the same model after a short supervised warm-up on the embedded sort task
(:mod:`aligner.data.synthetic`), so that it already solves part of the task:
the "pre-aligned" model that DPO starts from and FlipGuard anchors to.

Both are saved with ``save_pretrained`` under ``$ALIGNER_CACHE`` (default
``~/.cache/aligner``) and loaded back with ``from_pretrained`` like any user
checkpoint. Nothing is downloaded. Building is deterministic (seeded) and
atomic (written to a temporary folder, then renamed).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

PREFIX = "embedded:"
NAMES = {"tiny-random": 0, "tiny-sort": 200}  # name -> supervised warm-up steps
VERSION = "v1"  # bump when the recipe changes, so stale caches are not reused

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def cache_root() -> Path:
    return Path(os.environ.get("ALIGNER_CACHE", Path.home() / ".cache" / "aligner"))


def is_embedded(name_or_path: str) -> bool:
    return name_or_path.startswith(PREFIX)


def embedded_dir(name_or_path: str) -> Path:
    name = name_or_path[len(PREFIX):]
    if name not in NAMES:
        raise ValueError(f"unknown embedded model '{name_or_path}'; the embedded models are "
                         + ", ".join(PREFIX + n for n in NAMES))
    return cache_root() / f"{name}-{VERSION}"


def build_tokenizer():
    """A byte-level BPE tokenizer with no merges (it encodes any text) and a simple chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(vocab_size: int, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                intermediate_size: int = 256, num_heads: int = 4, num_kv_heads: int = 2):
    """A random-init Llama with HF's own initialisation (std 0.02), fp32, untied head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config)


def sft_warmup(model, tokenizer, steps: int, seed: int = 0, batch_size: int = 32, lr: float = 3e-3) -> float:
    """Supervised warm-up on correct answers of the sort task; returns the last loss."""
    from aligner.data.synthetic import sft_rows

    if steps == 0:
        return float("nan")
    rows = sft_rows(steps * batch_size, seed=seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        chunk = rows[step * batch_size:(step + 1) * batch_size]
        seqs, masks = [], []
        for prompt, answer in chunk:
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            seqs.append(p + a)
            masks.append([0] * len(p) + [1] * len(a))
        width = max(map(len, seqs))
        ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in seqs])
        labels = torch.tensor([[t if m else -100 for t, m in zip(s, mk)] + [-100] * (width - len(s))
                               for s, mk in zip(seqs, masks)])
        attn = (torch.arange(width)[None, :] < torch.tensor([len(s) for s in seqs])[:, None]).long()
        loss = model(input_ids=ids, attention_mask=attn, labels=labels, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


def ensure_embedded_model(name_or_path: str) -> Path:
    """Build the embedded model once (if its folder is missing) and return its folder."""
    target = embedded_dir(name_or_path)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    torch_threads = torch.get_num_threads()
    model = build_model(len(tokenizer))
    sft_warmup(model, tokenizer, NAMES[name_or_path[len(PREFIX):]])
    torch.set_num_threads(torch_threads)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, target)
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return target
