"""A reward model as the judge of regression on real tasks: FlipGuard's PPO-form test on generations.

For each prompt x, the model π_θ and its anchor π_pre each generate a greedy
response (aligner/evaluation/generate.py), and a reward model R (an
``AutoModelForSequenceClassification`` with one output, e.g. a Skywork- or
ArmoRM-style RM) scores both. The example is a *negative flip* when

    R(x, y_pre) − R(x, y_θ) > ε

and a positive flip when R(x, y_θ) − R(x, y_pre) > ε
(:func:`aligner.evaluation.regression.reward_model_flips`). The RM reads the pair through
its own tokenizer: as a chat ``[user: x, assistant: y]`` when that tokenizer has
a chat template, else as the text x + y.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from aligner.data import DataError
from aligner.models import ModelError


def check_reward_model(name_or_path: str, flag: str = "--reward-model") -> None:
    """Refuse what is not a reward model (no such folder or cached Hub ID, no config there, or not one score output),
    without loading weights."""
    from transformers import AutoConfig

    from aligner.models import hub

    path = Path(name_or_path)
    if not path.exists() and not hub.is_hub_id(name_or_path):
        raise ModelError(f"{flag}: the folder {name_or_path} does not exist (and it is not a Hub ID of the form "
                         f"org/name); give a reward model's folder (written by save_pretrained) or its Hub ID")
    if path.exists() and not (path / "config.json").is_file():
        raise ModelError(f"{flag}: {name_or_path} is not a model folder (no config.json there); give a reward model's "
                         f"folder written by save_pretrained, or its Hub ID")
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        what = "" if path.exists() else f"there is no folder {name_or_path}, and as a Hub ID it "
        raise ModelError(f"{flag}: {what}cannot load {name_or_path!r} ({str(exc).splitlines()[0]}); give a folder "
                         f"written by save_pretrained or the ID of a reward model in the local Hugging Face cache") from None
    if getattr(config, "num_labels", None) != 1:
        raise ModelError(f"{flag}: {name_or_path} has num_labels={getattr(config, 'num_labels', None)}; a reward model "
                         f"has one score output (AutoModelForSequenceClassification with num_labels=1)")


def load_reward_model(name_or_path: str, flag: str = "--reward-model"):
    """The reward model and its tokenizer, from a local folder or a Hub ID (through the HF cache, offline-safe)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    check_reward_model(name_or_path, flag)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(name_or_path, dtype=torch.float32).eval()
    if model.config.pad_token_id is None:  # batched scoring finds each row's last token through the pad id
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def rm_text(tokenizer, prompt: str, response: str) -> str:
    """What the reward model reads for (x, y): its chat template over [user: x, assistant: y], else x + y."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                             tokenize=False)
    return prompt + response


@torch.no_grad()
def score(model, tokenizer, prompts: list[str], responses: list[str], batch_size: int,
          progress: Callable | None = None) -> torch.Tensor:
    """R(x, y) for every (prompt, response), in batches of ``batch_size`` (right padding); shape (N,), float64."""
    tokenizer.padding_side = "right"
    out = []
    for start in range(0, len(prompts), batch_size):
        texts = [rm_text(tokenizer, p, r) for p, r in zip(prompts[start:start + batch_size], responses[start:start + batch_size])]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out.append(model(**enc).logits[:, 0].double())  # (b,)
        if progress is not None:
            progress(len(texts))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def generation_prompts(rows, tokenizer, label: str) -> tuple[list[str], list[str]]:
    """(what each model continues, what the reward model reads as x) for every row's ``prompt``:
    a string as it is; a message list through the policy's chat template, the RM reading its last message."""
    if "prompt" not in rows.column_names:
        raise DataError(f"{label}: the reward-model judge needs a 'prompt' column; the columns are {', '.join(rows.column_names)}")
    to_generate, to_judge = [], []
    for i, prompt in enumerate(rows["prompt"]):
        if isinstance(prompt, str):
            to_generate.append(prompt)
            to_judge.append(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "content" in m for m in prompt):
            to_generate.append(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
            to_judge.append(prompt[-1]["content"])
        else:
            raise DataError(f"{label}, row {i}, column 'prompt': expected a string or a list of chat messages, got {prompt!r}")
    return to_generate, to_judge
