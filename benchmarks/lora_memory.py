#!/usr/bin/env python
"""Full fine-tuning against LoRA on the CPU yardstick: peak RSS per rank and tok/s, beside TRL's LoRA DPO.

    python benchmarks/lora_memory.py [--steps 10 --lora-r 16]

The shared yardstick (benchmarks/workload.py ``CPU``: a 19M-parameter Llama, variable-length pairs), the same
rows in file order, 4 pairs per rank, 2 ZeRO-3 ranks on gloo, one row after another through the launcher:

- ``full``: every weight trains; the reference is an engine of its own (``train.cache_static_logps=false``);
- ``full, cached``: the same with the reference's log-probs cached in a pre-pass (no reference engine);
- ``lora``: ``model.lora`` (r, α = 2r, all-linear): the base is frozen, the optimizer holds the adapters'
  state only, the reference is the policy engine with its adapters off (no second copy of the weights);
- ``trl lora``: TRL 1.16's DPOTrainer with ``peft_config`` (the same LoraConfig) under ZeRO-3
  (benchmarks/trl_peer.py; the ``bench`` extra).

Peak RSS: the largest rank's, for the whole process (start-up and pre-pass included; ``perf/peak_mem_gib``,
``ru_maxrss``, as TRL's row measures it). tok/s: real tokens of
all ranks over the slowest rank's step time, after ``--warmup`` steps. Also printed: aligner-estimate's
per-rank total for each aligner row, and the machine's load average before and after. The table goes to
stdout and into benchmarks/RESULTS.md between the ``lora-memory`` markers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from results_md import command_line, free_port, write_section  # noqa: E402
import workload  # noqa: E402

from aligner.evaluation.report import read_scalars  # noqa: E402
from aligner.training.launcher import deepspeed_command  # noqa: E402

ROWS = {
    "full": ["train.cache_static_logps=false"],
    "full, cached": ["train.cache_static_logps=true"],
    "lora": ["train.cache_static_logps=false", "LORA"],
}


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1"}


def lora_sets(r: int) -> list[str]:
    return [f"model.lora.r={r}", f"model.lora.alpha={2 * r}"]


def aligner_sets(args, row: str, work: Path, spec: workload.Workload) -> list[str]:
    extra = [s for s in ROWS[row] if s != "LORA"] + (lora_sets(args.lora_r) if "LORA" in ROWS[row] else [])
    return [f"output_dir={work / 'runs' / row.replace(', ', '-')}", f"model.name_or_path={work / 'model'}",
            f"data.train={work / 'data' / 'prefs.jsonl'}", "data.eval=null", f"data.max_length={spec.max_length}",
            "data.shuffle=false", f"train.max_steps={args.steps}", f"train.micro_batch_size={args.pairs}",
            "train.lr=1e-5", "train.lr_schedule=constant", "train.warmup_steps=0", "train.save_every=0",
            "train.packing=true", "train.logps_chunk_tokens=1024", *extra]


def estimated_gib(sets: list[str]) -> float:
    from aligner.tools import estimate

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        estimate.main(["--config", str(ROOT / "configs/tiny-cpu.yaml"), "--plugins", "dpo", "--device", "cpu",
                       "--gpus", "2", "--json", "--set", *sets])
    text = out.getvalue()
    return json.loads(text[text.index("{\n"):])["peak_gib"]


def run_aligner(args, row: str, work: Path, spec: workload.Workload) -> dict:
    sets = aligner_sets(args, row, work, spec)
    cmd = deepspeed_command(["--config", "configs/tiny-cpu.yaml", "--plugins", "dpo", "--overwrite", "--set", *sets], 2)
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"row {row} failed:\n{proc.stderr[-3000:]}")
    out = work / "runs" / row.replace(", ", "-")
    s = read_scalars(out / "tensorboard")
    tok = [a * b for (_, a), (_, b) in zip(s["perf/tokens_per_s"], s["perf/step_time_s"])][args.warmup:]
    step = [v for _, v in s["perf/step_time_s"]][args.warmup:]
    built = [line for line in proc.stderr.splitlines() if "models built:" in line]
    return {"row": row, "tok_s": sum(tok) / sum(step), "peak_gib": s["perf/peak_mem_gib"][-1][1],
            "estimate_gib": estimated_gib(sets),
            "loss1": s["train/loss"][0][1], "built": built[0].split("models built: ")[-1] if built else ""}


def run_trl(args, work: Path, spec: workload.Workload) -> dict:
    out = work / "runs" / "trl-lora" / "result.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(HERE / "trl_peer.py"), "--model", str(work / "model"), "--data", str(work / "data" / "prefs.jsonl"),
           "--out", str(out), "--steps", str(args.steps), "--pairs", str(args.pairs), "--max-length",
           str(spec.max_length), "--lr", "1e-5", "--lora-r", str(args.lora_r)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"row trl lora failed:\n{proc.stderr[-3000:]}")
    r = json.loads(out.read_text())
    tok, step = r["tokens"][args.warmup:], r["step_time_s"][args.warmup:]
    return {"row": "trl lora", "tok_s": sum(tok) / sum(step), "peak_gib": max(r["peak_mem_gib_per_rank"]),
            "estimate_gib": float("nan"), "loss1": r["losses"][0], "built": "TRL: policy (peft), reference = adapters disabled"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--no-trl", action="store_true")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    spec = workload.CPU
    work = workload.ensure(spec, Path(tempfile.gettempdir()) / "aligner-yardstick-cpu")
    load_before = os.getloadavg()
    results = [run_aligner(args, row, work, spec) for row in ROWS]
    if not args.no_trl:
        results.append(run_trl(args, work, spec))
    load_after = os.getloadavg()
    rows = ["| row | peak RSS per rank (GiB) | aligner-estimate (GiB) | real tok/s | step-1 loss | models |",
            "|---|---|---|---|---|---|"]
    rows += [f"| {r['row']} | {r['peak_gib']:.2f} | {'—' if r['row'].startswith('trl') else format(r['estimate_gib'], '.2f')} | "
             f"{r['tok_s']:.0f} | {r['loss1']:.4f} | "
             f"{r['built']} |" for r in results]
    text = (f"## LoRA against full fine-tuning on the CPU yardstick (`benchmarks/lora_memory.py`)\n\n"
            f"`{command_line(__file__, argv)}` ({time.strftime('%Y-%m-%d', time.gmtime())}): 19M-parameter yardstick, "
            f"2 ZeRO-3 ranks (gloo), {args.pairs} pairs per rank, {args.steps} steps (tok/s after {args.warmup}), "
            f"packing and the chunked head on, LoRA r = {args.lora_r} (α = {2 * args.lora_r}, all-linear). Load "
            f"average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} (a shared 2-core machine).\n\n"
            + "\n".join(rows))
    print(text)
    if not args.no_write:
        write_section(HERE / "RESULTS.md", "lora-memory", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
