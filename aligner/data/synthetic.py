"""The embedded task: sort a short list of digits, with a known gold reward.

A prompt reads ``"sort 5 2 8 1 ="`` and the ideal response is ``" 1 2 5 8"``.
:func:`gold_reward` scores any response in [0, 1]: the share of positions that
hold the right digit, divided by the longer of the two lengths, so a missing,
extra or misplaced digit each cost something. Preference pairs are made by
corrupting the sorted answer a random number of times (swaps, replacements,
drops, duplicates) and ranking two such candidates by the gold reward.

Everything is seeded: the same seed gives the same rows, byte for byte.
Run ``python -m aligner.data.synthetic OUT_DIR`` to write ``train.jsonl`` and
``eval.jsonl`` and see the expected file format.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

DIGITS = "0123456789"
SPLIT_SEEDS = {"train": 1234, "eval": 5678}
SPLIT_SIZES = {"train": 2048, "eval": 256}
MIN_LEN, MAX_LEN = 3, 6


def make_prompt(digits: list[str]) -> str:
    return "sort " + " ".join(digits) + " ="


def format_answer(digits: list[str]) -> str:
    return "".join(" " + d for d in digits)


def _prompt_digits(prompt: str) -> list[str]:
    match = re.fullmatch(r"sort((?: \d)+) =", prompt.strip())
    if match is None:
        raise ValueError(f"not a prompt of the embedded sort task: {prompt!r}")
    return match.group(1).split()


def gold_reward(prompt: str, response: str) -> float:
    """Score ``response`` to ``prompt`` in [0, 1]; 1 only for exactly the sorted digits.

    ``matches / max(len(response digits), len(sorted digits))`` where a match is
    a position holding the right digit. Anything that is not a digit is ignored.
    """
    target = sorted(_prompt_digits(prompt))
    got = re.findall(r"\d", response)
    if not got:
        return 0.0
    matches = sum(a == b for a, b in zip(got, target))
    return matches / max(len(got), len(target))


def _corrupt(digits: list[str], n_edits: int, rng: random.Random) -> list[str]:
    out = list(digits)
    for _ in range(n_edits):
        op = rng.choice(("swap", "replace", "drop", "duplicate"))
        i = rng.randrange(len(out))
        if op == "swap" and len(out) > 1:
            j = min(i + 1, len(out) - 1) if i + 1 < len(out) else i - 1
            out[i], out[j] = out[j], out[i]
        elif op == "replace":
            out[i] = rng.choice(DIGITS)
        elif op == "drop" and len(out) > 1:
            out.pop(i)
        else:
            out.insert(i, out[i])
    return out


def make_rows(split: str, n: int | None = None, seed: int | None = None, conversational: bool = False) -> list[dict]:
    """Preference rows ``{id, prompt, chosen, rejected}`` of the embedded task.

    ``chosen`` has a strictly higher gold reward than ``rejected``. With
    ``conversational=True`` the prompt and responses are message lists.
    """
    rng = random.Random(SPLIT_SEEDS[split] if seed is None else seed)
    n = SPLIT_SIZES[split] if n is None else n
    rows = []
    while len(rows) < n:
        digits = [rng.choice(DIGITS) for _ in range(rng.randint(MIN_LEN, MAX_LEN))]
        prompt = make_prompt(digits)
        target = sorted(digits)
        a = format_answer(_corrupt(target, rng.choice((0, 0, 1, 2)), rng))
        b = format_answer(_corrupt(target, rng.choice((1, 2, 3)), rng))
        ra, rb = gold_reward(prompt, a), gold_reward(prompt, b)
        if ra == rb:
            continue
        chosen, rejected = (a, b) if ra > rb else (b, a)
        row = {"id": f"sort-{split}-{len(rows)}", "prompt": prompt, "chosen": chosen, "rejected": rejected}
        if conversational:
            row["prompt"] = [{"role": "user", "content": prompt}]
            row["chosen"] = [{"role": "assistant", "content": chosen}]
            row["rejected"] = [{"role": "assistant", "content": rejected}]
        rows.append(row)
    return rows


def sft_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, correct answer) pairs for the supervised warm-up of the embedded model."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        digits = [rng.choice(DIGITS) for _ in range(rng.randint(MIN_LEN, MAX_LEN))]
        out.append((make_prompt(digits), format_answer(sorted(digits))))
    return out


def write_jsonl(out_dir: str | Path, conversational: bool = False) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for split in SPLIT_SIZES:
        path = out_dir / f"{split}.jsonl"
        with path.open("w") as f:
            for row in make_rows(split, conversational=conversational):
                f.write(json.dumps(row) + "\n")
        paths.append(path)
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--conversational", action="store_true")
    args = parser.parse_args()
    for p in write_jsonl(args.out_dir, args.conversational):
        print(p)
