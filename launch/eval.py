"""Regression metrics of a model against its anchor (the pre-aligned model), single process, CPU or one GPU.

    python launch/eval.py --model runs/x/final --anchor embedded:tiny-sort --data embedded:eval --out eval.json

Prints and writes (json) what aligner/evaluation/regression.py defines: on the preference
pairs, the accuracy (log-likelihood margin > 0) of both models, the negative
and positive flip rates and the mean margins; and, when every prompt is one of
the embedded sort task, the generation judge: greedy responses of both models
scored by the task's gold reward. With ``--reward-model`` (a folder or a Hub ID
of an ``AutoModelForSequenceClassification``), the greedy responses to every
prompt of any dataset are scored by that reward model (aligner/evaluation/reward_judge.py):
NFR, PFR (a negative flip when R(x, y_pre) − R(x, y_θ) > ``--epsilon``) and the
mean rewards, and ``--scores-out`` gets the per-prompt responses and scores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from aligner.data import DataError, load_rows, tokenize_dataset
from aligner.data.synthetic import gold_reward
from aligner.evaluation.generate import generate
from aligner.evaluation.regression import generation_flips, likelihood_margins, preference_flips, reward_model_flips
from aligner.evaluation.reward_judge import check_reward_model, generation_prompts, load_reward_model, score
from aligner.models import ModelError, loading
from aligner.scoring.logps import score_pairs


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
    p.add_argument("--reward-model", default=None,
                   help="judge both models' greedy generations with this reward model (folder or Hub ID)")
    p.add_argument("--epsilon", type=float, default=0.0,
                   help="reward-model judge: a negative flip when R(x, y_anchor) - R(x, y_model) > epsilon (default: 0)")
    p.add_argument("--scores-out", default=None,
                   help="reward-model judge: json of per-prompt responses and scores (default: <out>_scores.json)")
    args = p.parse_args(argv)
    if args.epsilon < 0:
        p.error(f"--epsilon must be >= 0, got {args.epsilon}")
    return args


def load(path_or_name: str, flag: str, revision: str | None = None):
    from transformers import AutoModelForCausalLM

    path = loading.resolve_path(path_or_name, flag, revision)
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
    if args.reward_model:  # before any model is loaded or any text generated
        check_reward_model(args.reward_model)
    model, model_path = load(args.model, "--model", args.revision)
    anchor, anchor_path = load(args.anchor, "--anchor", args.revision)
    if model.config.vocab_size != anchor.config.vocab_size:
        raise ModelError(f"--anchor: {anchor_path} has a vocabulary of {anchor.config.vocab_size} tokens but "
                                f"--model {model_path} has {model.config.vocab_size}; they must share the tokenizer")
    tokenizer = loading.load_tokenizer(model_path)
    rows = load_rows(args.data, args.split, keys=("--split", "subset"))
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
    if args.reward_model:
        n_new = args.max_new_tokens or max(len(ex.chosen_ids) for ex in examples) + 4
        result["reward_model"], per_prompt = reward_model_judge(args, model, anchor, tokenizer, rows, n_new)
        scores_out = Path(args.scores_out or Path(args.out).with_suffix("").as_posix() + "_scores.json")
        scores_out.write_text(json.dumps(per_prompt, indent=1) + "\n")
        result["reward_model"]["scores_file"] = str(scores_out)
    return result


def reward_model_judge(args, model, anchor, tokenizer, rows, n_new: int) -> tuple[dict, list[dict]]:
    """Greedy responses of both models to every prompt, in batches, scored by ``--reward-model``."""
    from tqdm import tqdm

    rm, rm_tokenizer = load_reward_model(args.reward_model)
    to_generate, to_judge = generation_prompts(rows, tokenizer, f"--data ({args.data})")
    templated = bool(rows) and not isinstance(rows[0]["prompt"], str)
    responses, rewards = {}, {}
    with tqdm(total=4 * len(to_generate), desc="reward-model judge", unit="seq", file=sys.stderr) as bar:
        for name, m in (("model", model), ("anchor", anchor)):
            responses[name] = []
            for s in range(0, len(to_generate), args.batch_size):
                batch = to_generate[s:s + args.batch_size]
                # a chat template writes its own special tokens; a string prompt is tokenized as for training
                responses[name] += generate(m, tokenizer, batch, n_new, add_special_tokens=not templated)
                bar.update(len(batch))
        for name in ("model", "anchor"):
            rewards[name] = score(rm, rm_tokenizer, to_judge, responses[name], args.batch_size, bar.update)
    summary = reward_model_flips(rewards["model"], rewards["anchor"], args.epsilon)
    summary["reward_model"] = args.reward_model
    per_prompt = []
    for i, prompt in enumerate(to_judge):
        gap = float(rewards["anchor"][i] - rewards["model"][i])
        flip = "negative" if gap > args.epsilon else "positive" if -gap > args.epsilon else "none"
        per_prompt.append({"index": i, "prompt": prompt, "model_response": responses["model"][i],
                           "anchor_response": responses["anchor"][i], "model_reward": float(rewards["model"][i]),
                           "anchor_reward": float(rewards["anchor"][i]), "flip": flip})
    return summary, per_prompt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = evaluate(args)
    except (ModelError, DataError) as exc:
        print(f"eval: error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    print(text)
    Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
