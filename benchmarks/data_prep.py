"""Dataset preparation at scale: aligner cold and from its cache against TRL 1.16's own, on the same rows and tokenizer.

    python benchmarks/data_prep.py [--rows 60000] [--num-proc N] [--trl-workers] [--out DIR]

The script writes its own data: ``--rows`` conversational preference rows (prompt, chosen, rejected as message
lists) with UltraFeedback-like lengths (log-normal word counts: prompt median ~90 words, responses ~200, long
tails, capped at 2000), and trains a byte-level BPE tokenizer (16k vocabulary) on them, with a Llama-3-style chat
template whose turns end in ``<|eot_id|>``. Then, each from a cold datasets cache:

- aligner cold: :func:`aligner.data.prepare.prepare_split` (jsonl -> arrow -> formats -> batched tokenization on
  ``--num-proc`` workers -> the on-disk cache), and warm: the same call again (reads the cache);
- TRL: ``DPOTrainer._prepare_dataset`` of trl 1.16 (the ``bench`` extra), once with its default
  ``dataset_num_proc`` (one process), and with ``--trl-workers`` once more with ``--num-proc``, after the same
  ``load_dataset``.

It checks that both give the same token ids on every row, prints a table and writes it, with the command, to
benchmarks/RESULTS.md. Without trl installed the TRL rows are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the a of to and in is that for it with as was on be by this are or from at an which have not but can "
         "model data value code answer question example result step first then each more when also time use").split()
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
            "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
            "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)

    def text(median: float) -> str:
        k = int(min(2000, max(3, rng.lognormal(np.log(median), 0.8))))
        return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), k)) + f" {rng.integers(1 << 30)}."

    with path.open("w") as f:
        for i in range(n):
            prompt = [{"role": "user", "content": text(90)}]
            row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": text(200)}],
                   "rejected": [{"role": "assistant", "content": text(200)}], "id": str(i)}
            f.write(json.dumps(row) + "\n")


def train_tokenizer(path: Path, folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    lines = (line for i, line in enumerate(path.open()) if i < 5000)
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=16000, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|end_of_text|>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)
    return fast


def aligner_prep(data: Path, tokenizer, num_proc: int):
    from aligner.config import build_config
    from aligner.data.prepare import prepare_data

    cfg = build_config({"data": {"train": str(data), "eval": None, "max_length": 4096, "num_proc": num_proc}})
    started = time.perf_counter()
    train, _ = prepare_data(cfg, tokenizer)
    return time.perf_counter() - started, train


def trl_prep(data: Path, tokenizer, num_proc: int | None, cache: Path):
    import datasets
    from trl import DPOConfig, DPOTrainer

    class Holder:  # _prepare_dataset reads only self._tokenizer (for string rows' EOS)
        _tokenizer = tokenizer

    started = time.perf_counter()
    rows = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(cache))
    args = DPOConfig(output_dir=str(cache / "trl-out"), dataset_num_proc=num_proc, report_to=[], bf16=False, use_cpu=True)
    out = DPOTrainer._prepare_dataset(Holder(), rows, tokenizer, args, "train")
    return time.perf_counter() - started, out


def same_ids(ours, theirs) -> int:
    """Rows whose prompt/chosen/rejected ids differ between aligner and TRL."""
    by_id = {ex.id: ex for ex in ours}
    bad = 0
    for row in theirs.select_columns(["id", "prompt_ids", "chosen_ids", "rejected_ids"]):
        ex = by_id[row["id"]]
        bad += (ex.prompt_ids, ex.chosen_ids, ex.rejected_ids) != (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"])
    return bad


def measure(args: argparse.Namespace, out: Path) -> tuple[list[tuple[str, float, str]], dict]:
    data = out / "rows.jsonl"
    write_rows(data, args.rows)
    tokenizer = train_tokenizer(data, out / "tokenizer")
    table: list[tuple[str, float, str]] = []
    cold, ours = aligner_prep(data, tokenizer, args.num_proc)
    table.append((f"aligner cold (num_proc={args.num_proc})", cold, "jsonl -> arrow -> tokenize -> cache"))
    warm, _ = aligner_prep(data, tokenizer, args.num_proc)
    table.append(("aligner warm (cache)", warm, "same call again"))
    facts = {"rows": len(ours), "tokens": int(sum(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in ours))}
    try:
        import trl  # noqa: F401
    except ImportError:
        print("trl is not installed (pip install -e .[bench]): TRL rows skipped", file=sys.stderr)
        return table, facts
    for num_proc in (None, args.num_proc) if args.trl_workers else (None,):
        seconds, theirs = trl_prep(data, tokenizer, num_proc, out / f"trl-cache-{num_proc}")
        facts[f"mismatched_rows_{num_proc}"] = same_ids(ours, theirs)
        table.append((f"TRL 1.16 DPOTrainer._prepare_dataset (dataset_num_proc={num_proc})", seconds,
                      f"{facts[f'mismatched_rows_{num_proc}']} rows with other ids than aligner's"))
    return table, facts


def format_table(table: list[tuple[str, float, str]]) -> str:
    lines = ["| preparation | seconds | note |", "|---|---|---|"]
    lines += [f"| {name} | {seconds:.2f} | {note} |" for name, seconds, note in table]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=60000)
    p.add_argument("--num-proc", type=int, default=os.cpu_count() or 1)
    p.add_argument("--trl-workers", action="store_true", help="also time TRL with dataset_num_proc=--num-proc")
    p.add_argument("--out", help="working folder (default: a temporary one)")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md as it is")
    args = p.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="aligner-data-prep-"))
    out.mkdir(parents=True, exist_ok=True)
    # Cold caches, before datasets is imported (it reads HF_DATASETS_CACHE once).
    os.environ["HF_DATASETS_CACHE"] = str(out / "hf-datasets")
    os.environ["ALIGNER_CACHE"] = str(out / "aligner-cache")
    table, facts = measure(args, out)
    text = format_table(table)
    print(text)
    print(json.dumps(facts))
    if not args.no_write:
        from results_md import command_line, write_section

        ratios = ", ".join(f"cold / {n.split(' (')[0]} ({n.split('(')[-1].rstrip(')')}) = {table[0][1] / s:.2f}"
                           for n, s, _ in table if n.startswith("TRL"))
        summary = f"{ratios or 'TRL not installed'}; warm = {table[1][1]:.2f} s"
        write_section(Path(__file__).with_name("RESULTS.md"), "data_prep",
                      f"## Dataset preparation: aligner (cold, cached) against TRL 1.16\n\n"
                      f"Command: `{command_line(__file__, argv)}` ({facts['rows']} rows, {facts['tokens']} tokens, "
                      f"{os.cpu_count()} cores).\n\n{text}\n\n{summary}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
