"""The memory estimator against measured runs: real ZeRO-3 runs on CPU through the DeepSpeed launcher.

For each model size (random-init Llama checkpoints written with ``save_pretrained``), each rank count and
each plugin set (building 1, 2 or 3 models), it trains a few steps with ``benchmarks/rss_probe.py`` active,
reads each rank's peak RSS over steps 2..N, and puts it beside ``aligner-estimate --device cpu`` for the same
config. The 3-model set sets ``model.reference_path`` to a second checkpoint, so reference and anchor differ.

    python benchmarks/scale_cpu.py --sizes 20m,60m,100m --ranks 2,1 --write benchmarks/RESULTS.md

Keep the largest size small enough for the machine: 100M parameters with 3 models needs about 4.5 GiB per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # plugin_fixtures
sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_md, beside this script
from results_md import write_section  # noqa: E402

from aligner.training.launcher import deepspeed_command  # noqa: E402

#: name -> (hidden, intermediate, layers, heads, kv heads); the byte-level embedded tokenizer (259 tokens).
SIZES = {
    "5m": (256, 704, 6, 4, 2),
    "20m": (512, 1408, 7, 8, 2),
    "60m": (768, 2048, 9, 12, 4),
    "100m": (1024, 2816, 8, 16, 4),
    "150m": (1024, 2816, 12, 16, 4),
    "400m": (1536, 4096, 16, 16, 4),
}
#: plugin set -> (plugins, models it builds beside the policy, needs a second checkpoint as reference)
PLUGIN_SETS = {
    "1 model": ("plugin_fixtures.memory:ref_free", False),
    "2 models": ("dpo", False),
    "3 models": ("dpo,plugin_fixtures.memory:anchor_pull", True),
}
STEPS = 3


def write_checkpoint(path: Path, size: str, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from aligner.data import embedded

    if (path / "config.json").is_file():
        return
    hidden, inter, layers, heads, kv = SIZES[size]
    tokenizer = embedded.build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=512,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def write_data(path: Path, rows: int) -> None:
    """The first ``rows`` pairs of the embedded sort task as jsonl (a few steps need no more)."""
    from aligner.data import load_rows

    data = load_rows("embedded:train").select(range(rows))
    path.write_text("".join(json.dumps(row) + "\n" for row in data))


def write_config(path: Path, model: Path, reference: Path | None, data: Path, micro_batch: int, max_length: int) -> None:
    lines = ["plugins: [dpo]", "model:", f"  name_or_path: {model}"]
    if reference is not None:
        lines.append(f"  reference_path: {reference}")
    lines += ["data:", f"  train: {data}", "  eval: null", f"  max_length: {max_length}",
              "train:", f"  max_steps: {STEPS}", f"  micro_batch_size: {micro_batch}", "  lr: 1.0e-5",
              "  lr_schedule: constant", "  save_every: 0"]
    path.write_text("\n".join(lines) + "\n")



def predict(config: Path, plugins: str, ranks: int) -> dict:
    from aligner.tools import estimate

    args = estimate.parse_args(["--config", str(config), "--plugins", plugins, "--gpus", str(ranks), "--device", "cpu"])
    est = estimate.run_estimate(args)
    return {"model_gib": (est.steady_total - est.overhead) / estimate.GIB, "overhead_gib": est.overhead / estimate.GIB,
            "params": est.shape.num_params(), "frozen": [f.role for f in est.frozen]}


def measure(config: Path, plugins: str, ranks: int, out: Path, timeout: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "benchmarks"), str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))}
    cmd = deepspeed_command(["--config", str(config), "--plugins", f"{plugins},rss_probe:probe", "--set", f"output_dir={out}"], ranks)
    started = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads((out / f"rss_rank{r}.json").read_text()) for r in range(ranks)]
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    shutil.rmtree(out / "final", ignore_errors=True)
    return {"steps_gib": max(r["steps_gib"] for r in records), "through_step1_gib": max(r["through_step1_gib"] for r in records),
            "wall_s": time.time() - started}


def table(rows: list[dict], fitted: float) -> str:
    head = ("| size | params | ranks | plugins | frozen engines | predicted GiB/rank | measured GiB/rank | error "
            "| error with fitted overhead | peak incl. loading |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        pred = r["model_gib"] + r["overhead_gib"]
        fit = r["model_gib"] + fitted
        lines.append(f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['ranks']} | `{r['plugins']}` | {', '.join(r['frozen']) or 'none'} "
                     f"| {pred:.2f} ({r['model_gib']:.2f} + {r['overhead_gib']:.2f}) | {r['steps_gib']:.2f} "
                     f"| {100 * (pred - r['steps_gib']) / r['steps_gib']:+.1f}% | {100 * (fit - r['steps_gib']) / r['steps_gib']:+.1f}% "
                     f"| {r['through_step1_gib']:.2f} |")
    return "\n".join(lines)




def report(rows: list[dict], args: argparse.Namespace, argv: list[str] | None) -> None:
    fitted = statistics.median(r["steps_gib"] - r["model_gib"] for r in rows)
    errors = [abs(r["model_gib"] + r["overhead_gib"] - r["steps_gib"]) / r["steps_gib"] for r in rows]
    body = (table(rows, fitted) + f"\n\nPredicted = the estimator's model-dependent terms + its stated per-process overhead "
            f"({rows[0]['overhead_gib']:.2f} GiB on CPU). Measured = the largest rank's peak RSS (VmHWM) over steps 2..{STEPS}, "
            f"fp32, micro-batch {args.micro_batch} pairs x {args.max_length} tokens. The overhead that fits these runs best "
            f"(median of measured − model terms) is {fitted:.2f} GiB. Largest error with the stated overhead: "
            f"{100 * max(errors):.1f}%; rows within 15%: {sum(e <= 0.15 for e in errors)}/{len(rows)}. "
            f"\"peak incl. loading\" is VmHWM through step 1 (checkpoint loading and the first step), not estimated.")
    print(body, flush=True)
    if args.write:
        command = "python benchmarks/scale_cpu.py " + " ".join(f"'{a}'" if " " in a else a for a in (argv if argv is not None else sys.argv[1:]))
        write_section(Path(args.write), "scale_cpu", f"{body}\n\nCommand: `{command}`")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="20m,60m,100m", help=f"comma-separated, from {', '.join(SIZES)}")
    p.add_argument("--ranks", default="2,1")
    p.add_argument("--one-rank-sets", default="2 models", help="plugin sets that also run on 1 rank (the rest: only the "
                   "largest rank count of --ranks)")
    p.add_argument("--sets", default=",".join(PLUGIN_SETS), help="comma-separated plugin sets")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--workdir", help="where checkpoints and runs go (default: a temporary folder, removed after)")
    p.add_argument("--write", help="a RESULTS.md to write the table into (between the scale_cpu markers)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per run")
    p.add_argument("--rows-from", help="a file of rows this script printed (one JSON object a line, with --workdir): "
                   "recompute the predictions with the current estimator instead of measuring again")
    args = p.parse_args(argv)
    if args.rows_from:
        rows = []
        for line in Path(args.rows_from).read_text().splitlines():
            if not line.startswith("{"):
                continue
            row = json.loads(line)
            name = next(n for n, (plugins, _) in PLUGIN_SETS.items() if plugins.replace("plugin_fixtures.memory:", "") == row["plugins"])
            config = Path(args.workdir) / f"{row['size']}-{name.replace(' ', '')}.yaml"
            rows.append({**row, **predict(config, PLUGIN_SETS[name][0], row["ranks"])})
        report(rows, args, argv)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="scale-cpu-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    data = work / "pairs.jsonl"
    write_data(data, 2 * args.micro_batch * STEPS * 2)
    try:
        for size in args.sizes.split(","):
            model, other = work / f"{size}-a", work / f"{size}-b"
            write_checkpoint(model, size, seed=1)
            for set_name in args.sets.split(","):
                plugins, second = PLUGIN_SETS[set_name]
                if second:
                    write_checkpoint(other, size, seed=2)
                config = work / f"{size}-{set_name.replace(' ', '')}.yaml"
                write_config(config, model, other if second else None, data, args.micro_batch, args.max_length)
                rank_counts = [int(r) for r in args.ranks.split(",")]
                for ranks in rank_counts:
                    if ranks == 1 and len(rank_counts) > 1 and set_name not in args.one_rank_sets.split(","):
                        continue
                    row = {"size": size, "ranks": ranks, "plugins": plugins.replace("plugin_fixtures.memory:", ""),
                           **predict(config, plugins, ranks), **measure(config, plugins, ranks, work / "run", args.timeout)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    report(rows, args, argv)  # after every run, so a cut-short sweep still leaves its rows
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
