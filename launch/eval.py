"""Regression metrics of a model against its anchor (the pre-aligned model), single process, CPU or one GPU.

    python launch/eval.py --model runs/x/final --anchor embedded:tiny-sort --data embedded:eval --out eval.json

Prints and writes (json) what aligner/regression.py defines: on the preference
pairs, the accuracy (log-likelihood margin > 0) of both models, the negative
and positive flip rates and the mean margins; and, when every prompt is one of
the embedded sort task, the generation judge: greedy responses of both models
scored by the task's gold reward.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from aligner import models
from aligner.data import DataError, load_rows, tokenize_dataset
from aligner.data.synthetic import gold_reward
from aligner.generate import generate
from aligner.logps import score_pairs
from aligner.regression import generation_flips, likelihood_margins, preference_flips


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch/eval.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the aligned model: an HF checkpoint folder (e.g. <output_dir>/final) or a Hub ID")
    p.add_argument("--anchor", required=True, help="the pre-aligned model: a Hub ID (org/name), an HF checkpoint folder, "
                                                   "or embedded:tiny-sort")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit) of models named by Hub ID")
    p.add_argument("--data", required=True, help="preference data (a Hub dataset ID, jsonl/json/parquet, a dataset folder, "
                                                 "or embedded:eval)")
    p.add_argument("--split", help="the split of --data to read, for datasets with splits (e.g. test_prefs)")
    p.add_argument("--out", default="regression_eval.json", help="json file to write (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=1024, help="truncate prompt+response to this many tokens")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation length for the embedded-task judge (default: longest chosen response + 4)")
    return p.parse_args(argv)


def load(path_or_name: str, flag: str, revision: str | None = None):
    from transformers import AutoModelForCausalLM

    path = models.resolve_path(path_or_name, flag, revision)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), path


def task_prompts(rows) -> list[str] | None:
    """The prompts, when every row is one of the embedded sort task (else None: no gold reward)."""
    prompts = [row.get("prompt") for row in rows]
    try:
        for prompt in prompts:
            if not isinstance(prompt, str):
                return None
            gold_reward(prompt, "")
    except ValueError:
        return None
    return prompts


def evaluate(args: argparse.Namespace) -> dict:
    model, model_path = load(args.model, "--model", args.revision)
    anchor, anchor_path = load(args.anchor, "--anchor", args.revision)
    if model.config.vocab_size != anchor.config.vocab_size:
        raise models.ModelError(f"--anchor: {anchor_path} has a vocabulary of {anchor.config.vocab_size} tokens but "
                                f"--model {model_path} has {model.config.vocab_size}; they must share the tokenizer")
    tokenizer = models.load_tokenizer(model_path)
    rows = load_rows(args.data, args.split)
    examples = tokenize_dataset(rows, tokenizer, args.max_length, None, "error", f"--data ({args.data})")
    pad = tokenizer.pad_token_id
    result = {
        "model": str(model_path), "anchor": str(anchor_path), "data": args.data, "n_examples": len(examples),
        "preference": preference_flips(likelihood_margins(score_pairs(model, examples, args.batch_size, pad)),
                                       likelihood_margins(score_pairs(anchor, examples, args.batch_size, pad))),
    }
    prompts = task_prompts(rows)
    if prompts is not None:
        n_new = args.max_new_tokens or max(len(ex.chosen_ids) for ex in examples) + 4
        rewards = {}
        for name, m in (("model", model), ("anchor", anchor)):
            texts = [t for s in range(0, len(prompts), args.batch_size)
                     for t in generate(m, tokenizer, prompts[s:s + args.batch_size], n_new)]
            rewards[name] = torch.tensor([gold_reward(p, t) for p, t in zip(prompts, texts)])
        result["generation"] = generation_flips(rewards["model"], rewards["anchor"])
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = evaluate(args)
    except (models.ModelError, DataError) as exc:
        print(f"eval: error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    print(text)
    Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
