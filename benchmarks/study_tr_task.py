"""The trust-region study's preference data: the SFT model's own samples, ranked by the gold reward.

Why not ``embedded:train``. Its pairs are corruptions of the sorted answer (0–2 edits against 1–3), far
from what the SFT model writes. Trained on them, plain DPO never rises above the SFT model: its greedy gold
reward falls from the first checkpoint at lr 1e-3 and 3e-4, and stays within noise of it at 1e-4
(pilots in ``benchmarks/RESULTS.md``). With only losses, a study cannot show which method loses least.

What the study trains on instead is the setting of Rafailov et al. 2024 ("Scaling Laws for Reward Model
Overoptimization in Direct Alignment Algorithms") and of the TR-DPO paper's own experiments: pairs of
the SFT policy's samples. For each of ``n_prompts`` prompts (sort task, a seed disjoint from the held-out
prompts) the SFT model samples ``k`` responses at temperature 1; ``chosen`` is the one with the highest
gold reward (:func:`aligner.data.synthetic.gold_reward`), ``rejected`` the lowest; prompts whose samples all
score the same, or with an empty sample, are dropped. The labels agree with the gold reward on every pair:
there is no proxy reward model. What makes DPO overoptimize here is the one known to direct alignment: the
policy is pushed off the data's support as KL grows (gold first rises, then falls), which is what the
trust region is claimed to temper.

Everything is seeded; the file is written once per recipe (its name carries the settings) and reused.
"""

from __future__ import annotations

import json
from pathlib import Path

from aligner.data.synthetic import gold_reward, sft_rows
from aligner.evaluation.generate import generate

#: prompts of the training pairs; the held-out prompts of the study use another seed (study_tr.EVAL_PROMPT_SEED)
TRAIN_PROMPT_SEED = 4242
MAX_NEW_TOKENS = 16  # the longest answer (6 digits) is 12 characters + EOS


def sampled_pairs(model, tokenizer, n_prompts: int = 3072, k: int = 4, seed: int = 0, batch: int = 512) -> list[dict]:
    """Rows ``{id, prompt, chosen, rejected}``: best and worst by gold of ``k`` SFT samples per prompt."""
    prompts = [p for p, _ in sft_rows(n_prompts, seed=TRAIN_PROMPT_SEED + seed)]
    samples: list[list[str]] = [[] for _ in prompts]
    for draw in range(k):
        for start in range(0, len(prompts), batch):
            outs = generate(model, tokenizer, prompts[start:start + batch], MAX_NEW_TOKENS, temperature=1.0,
                            seed=1_000_003 * draw + start + seed)
            for i, text in enumerate(outs):
                samples[start + i].append(text)
    rows = []
    for i, (prompt, texts) in enumerate(zip(prompts, samples)):
        if any(not t.strip() for t in texts):
            continue  # an empty response is a bad row for the trainer (data.on_bad_row)
        scores = [gold_reward(prompt, t) for t in texts]
        best, worst = max(range(k), key=scores.__getitem__), min(range(k), key=scores.__getitem__)
        if scores[best] > scores[worst]:
            rows.append({"id": f"sft-sample-{i}", "prompt": prompt, "chosen": texts[best], "rejected": texts[worst]})
    return rows


def ensure_pairs(out_dir: Path, model, tokenizer, n_prompts: int = 3072, k: int = 4, seed: int = 0) -> Path:
    """The study's training pairs as jsonl under ``out_dir`` (built once, then reused)."""
    path = out_dir / f"sft_sample_pairs-n{n_prompts}-k{k}-seed{seed}.jsonl"
    if not path.is_file():
        rows = sampled_pairs(model, tokenizer, n_prompts, k, seed)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.rename(path)
    return path
