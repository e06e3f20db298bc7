"""Sequence parallelism on long pairs: peak RSS per rank and tok/s at SP = 1 and SP = 2, beside aligner-estimate.

The CPU yardstick's model (benchmarks/workload.py ``CPU``: 19.2M-parameter Llama, hidden 256, 4 layers, 8/2
heads, vocab 32000, fp32) on long preference pairs. Each sequence is exactly ``L`` tokens (prompt L/2, each
response L/2 with its EOS), one pair per rank per step, packed without prefix sharing. So a row is 2L tokens,
which is what the estimator counts for ``data.max_length: L`` and one pair. Both modes run on 2 ZeRO-3 ranks
under the DeepSpeed launcher:

- ``SP=1``: 2 data-parallel ranks, each with its own pair (2 pairs per step);
- ``SP=2``: the 2 ranks share each row (1 pair per step), ``train.sequence_parallel: 2``.

``benchmarks/rss_probe.py`` reads each rank's peak RSS over steps 2..N. tok/s is ``perf/tokens_per_s`` (real
tokens summed over ranks per second of the slowest rank) averaged over steps 2..N. The longest pair under
``--cap-gib`` is the longest ``L`` of the sweep whose measured peak fits, per mode.

    python benchmarks/sp_memory.py --lengths 1024,2048,4096 --cap-gib 1.5 --write benchmarks/RESULTS.md

Under ``nice``, on the shared 2-core machine: a few minutes per length at 4096 and above.

On 2 GPUs (``--device cuda``): the ``CUDA`` workload's model (Llama-3.2-1B shapes, ``model.dtype: auto``, i.e.
bf16), NCCL, and the peak of torch's allocated GPU memory per rank beside ``aligner-estimate`` (GPU):

    python benchmarks/sp_memory.py --device cuda --lengths 4096,16384 --cap-gib 60
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # workload, results_md, rss_probe beside this script
from results_md import command_line, write_section  # noqa: E402

from aligner.training.launcher import deepspeed_command  # noqa: E402

STEPS = 3


def write_data(path: Path, length: int, pairs: int, spec, seed: int = 7) -> None:
    """``pairs`` rows whose prompt + chosen and prompt + rejected are each exactly ``length`` tokens (one word, one
    token; the EOS ends each response), words from the workload ``spec``'s vocabulary."""
    import random

    from workload import SPECIALS, _words

    words = _words(spec.vocab - len(SPECIALS), random.Random(spec.seed))
    rng = random.Random(seed)
    prompt, response = length // 2, length - length // 2

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    with path.open("w") as f:
        for _ in range(pairs):
            f.write(json.dumps({"prompt": text(prompt), "chosen": " " + text(response - 1),
                                "rejected": " " + text(response - 1)}) + "\n")


def write_config(path: Path, model: Path, data: Path, length: int, sp: int) -> None:
    lines = ["plugins: [dpo]", "model:", f"  name_or_path: {model}", "data:", f"  train: {data}", "  eval: null",
             f"  max_length: {length}", "  shuffle: false", "train:", f"  max_steps: {STEPS}", "  micro_batch_size: 1",
             "  lr: 1.0e-5", "  lr_schedule: constant", "  save_every: 0", "  prefix_sharing: false",
             f"  sequence_parallel: {sp}", "eval:", "  batch_size: 1"]
    path.write_text("\n".join(lines) + "\n")


def predict(config: Path, ranks: int, device: str) -> float:
    """aligner-estimate's peak per rank (GiB) for ``config`` on ``ranks`` ranks."""
    from aligner.tools import estimate

    est = estimate.run_estimate(estimate.parse_args(["--config", str(config), "--gpus", str(ranks), "--device", device]))
    return est.peak / estimate.GIB


def measure(config: Path, ranks: int, out: Path, timeout: int, device: str = "cpu") -> dict:
    from aligner.evaluation.report import read_scalars

    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")]))}
    cmd = deepspeed_command(["--config", str(config), "--plugins", "dpo,rss_probe:probe", "--set", f"output_dir={out}"],
                            ranks)
    started = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads((out / f"rss_rank{r}.json").read_text()) for r in range(ranks)]
    scalars = read_scalars(out / "tensorboard")
    tok_s = [v for s, v in scalars["perf/tokens_per_s"] if s >= 2]
    key = "gpu_steps_gib" if device == "cuda" else "steps_gib"  # torch's allocated GPU memory, or the RSS
    row = {"peak_gib": max(r[key] for r in records), "ranks_gib": [round(r[key], 3) for r in records],
           "tok_s": sum(tok_s) / len(tok_s), "step_s": max(r["step_s"] for r in records),
           "loss1": scalars["train/loss"][0][1], "wall_s": time.time() - started}
    shutil.rmtree(out, ignore_errors=True)
    return row


def table(rows: list[dict], cap: float, load: str, device: str = "cpu") -> str:
    what = "peak GPU memory allocated per rank" if device == "cuda" else "peak RSS per rank"
    lines = [f"| pair (tokens per sequence) | row tokens | SP | pairs/step | {what} (GiB) | aligner-estimate "
             "(GiB) | error | real tok/s | s/step | step-1 loss |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = 100 * (r["predicted_gib"] - r["peak_gib"]) / r["peak_gib"]
        lines.append(f"| {r['length']} | {2 * r['length']} | {r['sp']} | {2 // r['sp']} | {r['peak_gib']:.2f} "
                     f"({', '.join(f'{g:.2f}' for g in r['ranks_gib'])}) | {r['predicted_gib']:.2f} | {err:+.1f}% "
                     f"| {r['tok_s']:.0f} | {r['step_s']:.1f} | {r['loss1']:.4f} |")
    longest = {}
    for sp in sorted({r["sp"] for r in rows}):
        fits = [r["length"] for r in rows if r["sp"] == sp and r["peak_gib"] <= cap]
        longest[sp] = max(fits) if fits else None
    text = "\n".join(lines)
    text += (f"\n\nLongest pair under a {cap:g} GiB {'GPU memory' if device == 'cuda' else 'RSS'} cap per rank (of "
             f"the lengths measured): "
             + ", ".join(f"SP={sp}: {f'{v} tokens per sequence' if v else 'none'}" for sp, v in longest.items())
             + f". Load average during the sweep: {load}.")
    return text


def section(device: str) -> str:
    """The RESULTS.md section this script writes: one per device."""
    return "sp_memory" if device == "cpu" else "sp_memory_cuda"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="1024,2048,4096", help="tokens per sequence (prompt + response), comma-separated")
    p.add_argument("--modes", default="1,2", help="sequence-parallel sizes to run on 2 ranks")
    p.add_argument("--cap-gib", type=float, default=1.5, help="the RSS cap per rank for the longest-pair column")
    p.add_argument("--workdir", help="where the model, data and runs go (default: a temporary folder, removed after)")
    p.add_argument("--write", help="a RESULTS.md to write the table into (between the sp_memory markers)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: the CPU yardstick's model on gloo; cuda: Llama-3.2-1B shapes on 2 GPUs (NCCL)")
    p.add_argument("--rows-from", help="a log of this script (its JSON rows): print and write the table again, with "
                   "the current estimator's predictions, without measuring")
    args = p.parse_args(argv)
    if args.rows_from:
        rows = [json.loads(line) for line in Path(args.rows_from).read_text().splitlines() if line.startswith("{")]
        work = Path(args.workdir or tempfile.mkdtemp(prefix="sp-memory-"))
        from workload import CPU, CUDA, ensure

        spec = CUDA if args.device == "cuda" else CPU
        model = ensure(spec, work / spec.name) / "model"
        for row in rows:
            config = work / f"sp{row['sp']}-{row['length']}.yaml"
            write_config(config, model, work / f"pairs-{row['length']}.jsonl", row["length"], row["sp"])
            row["predicted_gib"] = predict(config, 2, "gpu" if args.device == "cuda" else "cpu")
        body = table(rows, args.cap_gib, rows[-1].get("load", "see the log"), args.device)  # the range so far
        print(body)
        if args.write:
            write_section(Path(args.write), section(args.device), f"{body}\n\nCommand: `{command_line(__file__, argv)}`")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from workload import CPU, CUDA, ensure

    spec = CUDA if args.device == "cuda" else CPU
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sp-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    loads = []
    try:
        model = ensure(spec, work / spec.name) / "model"
        for length in [int(x) for x in args.lengths.split(",")]:
            data = work / f"pairs-{length}.jsonl"
            write_data(data, length, 2 * STEPS, spec)
            for sp in [int(x) for x in args.modes.split(",")]:
                config = work / f"sp{sp}-{length}.yaml"
                write_config(config, model, data, length, sp)
                loads.append(os.getloadavg()[0])
                row = {"length": length, "sp": sp,
                       "predicted_gib": predict(config, 2, "gpu" if args.device == "cuda" else "cpu"),
                       **measure(config, 2, work / "run", args.timeout, args.device)}
                loads.append(os.getloadavg()[0])
                row["load"] = f"{min(loads):.1f}–{max(loads):.1f}"
                rows.append(row)
                print(json.dumps(row), flush=True)
                body = table(rows, args.cap_gib, f"{min(loads):.1f}–{max(loads):.1f}", args.device)
                print(body, flush=True)
                if args.write:
                    write_section(Path(args.write), section(args.device), f"{body}\n\nCommand: `{command_line(__file__, argv)}`")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
