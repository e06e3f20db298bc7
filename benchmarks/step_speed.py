#!/usr/bin/env python
"""Benchmark A/B: aligner's DPO step, fast-path switches off and on, beside TRL's DPOTrainer, in one run.

    python benchmarks/step_speed.py --device cpu     # Benchmark A, the CPU yardstick (2 ranks, ZeRO-3, gloo)
    python benchmarks/step_speed.py --device cuda    # Benchmark B, Llama-3.2-1B shapes, bf16, every visible GPU
    python benchmarks/step_speed.py --smoke          # a tiny workload, 2 steps: does every row run?

Every row runs the same model, rows and batches (file order, ``data.shuffle=false``; 4 pairs per rank)
through a real launcher, one row after another:

- ``default``: no batch switch at all, aligner's defaults (packed + prefix-shared + chunked head + reference
  log-probs cached + ranks balanced by tokens; the run logs its ``batch path:``);
- ``unshared``: the defaults with ``train.prefix_sharing=false`` (what prefix sharing alone brings);
- ``unbalanced``: the defaults with ``train.balance_ranks=false`` (rank imbalance before/after);
- the earlier switch-by-switch rows, each with prefix sharing and rank balancing off:
  ``naive`` (padded batches, full logits, every fast-path switch off), ``packing`` (``train.packing=true``),
  ``chunked`` (``train.logps_chunk_tokens=1024``), ``cached`` (``train.cache_static_logps=true``, the other
  switch rows turn it off: the reference's log-probs come from a one-time pre-pass before step 1, which the
  per-step figures leave out), ``fast`` (those three together);
- ``trl``: TRL 1.16's DPOTrainer under DeepSpeed ZeRO-3 (``benchmarks/trl_peer.py``; the ``bench`` extra), at
  its best: ``precompute_ref_log_probs`` (a pre-pass, as aligner's cache). With ``--plugins`` holding a
  reference-update plugin, TRL runs with ``sync_ref_model`` every step (it refuses precomputed reference
  log-probs then), and aligner's rows update the reference every step too (``tr_soft.every=1``).

``--workload long`` swaps the CPU yardstick's pairs for long-prompt ones (multi-turn-like: prompt mean about 4×
the response mean, same model): where prefix sharing matters most.

Real tok/s: the non-pad prompt+response tokens the policy processed over all ranks, divided by the
slowest rank's step time, over the steps after ``--warmup`` (aligner reads ``perf/tokens_per_s`` and
``perf/step_time_s`` back from TensorBoard). Real tok per CPU-s divides the same tokens by the CPU
seconds all ranks spent in those steps (``perf/cpu_s``): on a machine shared with other jobs it moves
far less than wall time does. Pairs/s: preference pairs per second of the slowest
rank's step time. Rank imbalance: the busiest rank's real tokens over the mean rank's per step
(``perf/rank_imbalance``), averaged over the timed steps (1.00 = balanced). Peak memory: the largest rank's
peak RSS on CPU, peak allocated GPU memory on GPU. The table goes to stdout and, unless ``--smoke`` or ``--no-write``, into
``benchmarks/RESULTS.md`` between the ``step_speed`` markers (``step_speed_<plugins>`` for another plugin set),
with the command that produced it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from results_md import command_line, free_port, write_section  # noqa: E402

from aligner.evaluation.report import read_scalars  # noqa: E402
from aligner.training.launcher import deepspeed_command  # noqa: E402
import workload  # noqa: E402

CHUNK_TOKENS = 1024
REFERENCE_UPDATERS = ("tr_soft", "tr_hard")


@dataclass
class Row:
    name: str
    sets: list[str] = field(default_factory=list)
    note: str = ""


NO_CACHE = "train.cache_static_logps=false"
#: the switch rows measure what they always did: no prefix sharing, no rank balancing
OLD = ["train.prefix_sharing=false", "train.balance_ranks=false"]
ALIGNER_ROWS = {
    "naive": Row("naive", ["train.packing=false", "train.logps_chunk_tokens=0", NO_CACHE, *OLD],
                 "padded, full logits, reference forward every step"),
    "packing": Row("packing", ["train.packing=true", "train.logps_chunk_tokens=0", NO_CACHE, *OLD], "packed, full logits"),
    "chunked": Row("chunked", ["train.packing=false", f"train.logps_chunk_tokens={CHUNK_TOKENS}", NO_CACHE, *OLD],
                   "padded, chunked"),
    "cached": Row("cached", ["train.packing=false", "train.logps_chunk_tokens=0", "train.cache_static_logps=true", *OLD],
                  "padded, full logits, reference log-probs cached (one pre-pass before step 1, not in the figures)"),
    "fast": Row("fast", ["train.packing=true", f"train.logps_chunk_tokens={CHUNK_TOKENS}", "train.cache_static_logps=true",
                         *OLD], "packed + chunked + reference log-probs cached (pre-pass not in the figures)"),
    "default": Row("default", [], "defaults, no flags: packed + prefix-shared + chunked + reference log-probs cached "
                   "+ balanced ranks"),
    "unshared": Row("unshared", ["train.prefix_sharing=false"], "defaults without prefix sharing"),
    "unbalanced": Row("unbalanced", ["train.balance_ranks=false"], "defaults without rank balancing"),
}
#: the rows ``--fast-set`` applies to
FAST_ROWS = ("fast", "default", "unshared", "unbalanced")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--smoke", action="store_true", help="tiny workload, 2 steps, results not written to RESULTS.md")
    p.add_argument("--rows", default="default,unshared,naive,fast,trl", help="comma-separated subset of "
                   + ",".join([*ALIGNER_ROWS, "trl"]))
    p.add_argument("--workload", choices=("cpu", "long"), default="cpu",
                   help="CPU workload: the shared yardstick, or long prompts (prompt mean ~4x the response mean)")
    p.add_argument("--plugins", default="dpo", help="aligner's plugin set, e.g. dpo or dpo,tr_soft,flipguard")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per row (default 8; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="first steps left out of the figures (default 2; smoke 0)")
    p.add_argument("--nproc", type=int, default=None, help="ranks (default: 2 on CPU, every visible GPU on cuda)")
    p.add_argument("--pairs", type=int, default=4, help="preference pairs per rank per step")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="aligner config override for every aligner row (repeatable)")
    p.add_argument("--fast-set", dest="fast_sets", action="append", default=[], metavar="KEY=VALUE",
                   help="aligner config override for the fast and default rows only, e.g. model.gradient_checkpointing=true")
    p.add_argument("--work", default=os.environ.get("BENCH_WORK", os.path.join(tempfile.gettempdir(), "aligner-bench")),
                   help="workload and run folder (the shared make_workload.py's default, $BENCH_WORK)")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per row")
    args = p.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.rows if r not in ALIGNER_ROWS and r != "trl"]
    if unknown:
        p.error(f"--rows: unknown row(s) {', '.join(unknown)}; choose from {', '.join([*ALIGNER_ROWS, 'trl'])}")
    if args.smoke and args.device == "cuda":
        p.error("--smoke runs on CPU only")
    if args.workload == "long" and (args.smoke or args.device == "cuda"):
        p.error("--workload long is a CPU workload; leave out --smoke and --device cuda")
    args.steps = args.steps or (2 if args.smoke else 8)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.smoke else 2)
    if args.warmup >= args.steps:
        p.error(f"--warmup ({args.warmup}) must be below --steps ({args.steps})")
    if args.nproc is None:
        args.nproc = 2 if args.device == "cpu" else _gpu_count()
    return args


def _gpu_count() -> int:
    import torch

    return max(1, torch.cuda.device_count())



def spec_for(args: argparse.Namespace) -> workload.Workload:
    if args.smoke:
        return workload.SMOKE
    return workload.CUDA if args.device == "cuda" else (workload.LONG if args.workload == "long" else workload.CPU)


def run_env(args: argparse.Namespace) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # one thread per rank, 2 ranks on the 2-core yardstick (as the shared peers)
    return env


def plugin_names(plugins: str) -> list[str]:
    """``--plugins`` as a list of names: "dpo, tr_soft" -> ["dpo", "tr_soft"]."""
    return [p.strip() for p in plugins.split(",") if p.strip()]


def update_every_step(plugins: str) -> list[str]:
    """τ = 1 for a reference-update plugin, as the TRL row's ``ref_model_sync_steps=1``: both rows pay for an
    update every step (``--set`` can still change it)."""
    return [f"{name}.every=1" for name in REFERENCE_UPDATERS if name in plugin_names(plugins)]


def aligner_command(args: argparse.Namespace, row: Row, work: Path, spec: workload.Workload) -> list[str]:
    out = work / "runs" / row.name
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    sets = [f"output_dir={out}", f"model.name_or_path={work / 'model'}", f"data.train={work / 'data' / 'prefs.jsonl'}",
            "data.eval=null", f"data.max_length={spec.max_length}", "data.shuffle=false", f"model.dtype={dtype}",
            f"train.max_steps={args.steps}", f"train.micro_batch_size={args.pairs}", "train.lr=1e-6",
            "train.lr_schedule=constant", "train.save_every=0", *row.sets, *update_every_step(args.plugins), *args.sets]
    if row.name in FAST_ROWS:
        sets += args.fast_sets
    return deepspeed_command(["--plugins", args.plugins, "--overwrite", "--set", *sets], args.nproc)


def summarize(step_time: list[float], cpu_s: list[float], tokens: list[float], losses: list[float], peak_gib: float,
              warmup: int, pairs_per_step: int, mfu: list[float] | None = None,
              imbalance: list[float] | None = None) -> dict:
    t, c, n = step_time[warmup:], cpu_s[warmup:], tokens[warmup:]
    out = {"tok_s": sum(n) / sum(t), "tok_cpu_s": sum(n) / sum(c), "s_per_step": statistics.median(t), "peak_gib": peak_gib,
           "pairs_s": pairs_per_step * len(t) / sum(t), "loss1": losses[0], "losses": losses, "steps": len(step_time)}
    if mfu:
        out["mfu"] = statistics.mean(mfu[warmup:])
    if imbalance:
        out["imbalance"] = statistics.mean(imbalance[warmup:])
    return out


def row_note(row: Row, plugins: str) -> str:
    """The row's description for this plugin set: which frozen models run a forward every step, which are cached."""
    names = set(plugin_names(plugins))
    moving = bool(names & set(REFERENCE_UPDATERS))
    frozen = ["reference"] + (["anchor"] if "flipguard" in names else [])
    if NO_CACHE in row.sets:  # every frozen model runs a forward every step
        every_step = ("reference and anchor forwards every step" if moving and len(frozen) > 1 else
                      "reference forward every step" + (" (one engine, shared with the anchor)" if len(frozen) > 1 else ""))
        return row.note.replace("reference forward every step", every_step)
    cached = [m for m in frozen if m == "anchor" or not moving]
    live = [m for m in frozen if m not in cached]
    what = " and ".join(cached) + " log-probs cached" + (f", {' and '.join(live)} live (moved by the plugin)" if live else "")
    return row.note.replace("reference log-probs cached", what)


def run_aligner_row(args: argparse.Namespace, row: Row, work: Path, spec: workload.Workload) -> dict:
    cmd = aligner_command(args, row, work, spec)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env(args), capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"row {row.name} failed (exit {proc.returncode}):\n{shlex.join(cmd)}\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    s = read_scalars(work / "runs" / row.name / "tensorboard")
    tok_s = [v for _, v in s["perf/tokens_per_s"]]
    step_time = [v for _, v in s["perf/step_time_s"]]
    result = summarize(step_time, [v for _, v in s["perf/cpu_s"]], [a * b for a, b in zip(tok_s, step_time)],
                       [v for _, v in s["train/loss"]],
                       max(v for _, v in s["perf/peak_mem_gib"]), args.warmup, args.nproc * args.pairs,
                       [v for _, v in s["perf/mfu"]] if "perf/mfu" in s else None,
                       [v for _, v in s["perf/rank_imbalance"]] if "perf/rank_imbalance" in s else None)
    result.update(row=row.name, note=row_note(row, args.plugins), wall_s=wall, output_dir=str(work / "runs" / row.name))
    return result


def run_trl_row(args: argparse.Namespace, work: Path, spec: workload.Workload) -> dict:
    out = work / "runs" / "trl" / "result.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    sync = bool(update_every_step(args.plugins))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--master_port", str(free_port()), str(HERE / "trl_peer.py"), "--model", str(work / "model"),
           "--data", str(work / "data" / "prefs.jsonl"), "--out", str(out), "--steps", str(args.steps),
           "--pairs", str(args.pairs), "--max-length", str(spec.max_length),
           "--dtype", "bfloat16" if args.device == "cuda" else "float32",
           *(["--sync-ref"] if sync else ["--precompute-ref"])]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env(args), capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - started
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"row trl failed (exit {proc.returncode}):\n{shlex.join(cmd)}\n{proc.stderr[-4000:]}")
    r = json.loads(out.read_text())
    result = summarize(r["step_time_s"], r["cpu_s"], r["tokens"], r["losses"], max(r["peak_mem_gib_per_rank"]),
                       args.warmup, args.nproc * args.pairs)
    note = "TRL 1.16 DPOTrainer, ZeRO-3" + (", sync_ref_model every step (no FlipGuard in TRL)" if sync else
                                             ", precompute_ref_log_probs (pre-pass not in the figures)")
    result.update(row="trl", note=note, wall_s=wall)
    return result


def table(results: list[dict], skipped: dict[str, str], device: str) -> str:
    by = {r["row"]: r for r in results}
    trl, naive = by.get("trl"), by.get("naive")
    mem = "peak GPU GiB (max rank)" if device == "cuda" else "peak RSS GiB (max rank)"
    cols = ["row", "what", "real tok/s", "pairs/s", "real tok per CPU-s", "s/step (median)", mem, "rank imbalance",
            "step-1 loss"]
    if device == "cuda":
        cols.append("MFU")
    cols += ["tok/s vs TRL", "tok/CPU-s vs TRL", "memory vs TRL", "tok/s vs naive", "tok/CPU-s vs naive"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        cells = [r["row"], r["note"], f"{r['tok_s']:.0f}", f"{r['pairs_s']:.2f}", f"{r['tok_cpu_s']:.0f}",
                 f"{r['s_per_step']:.2f}", f"{r['peak_gib']:.2f}",
                 f"{r['imbalance']:.2f}" if "imbalance" in r else "–", f"{r['loss1']:.4f}"]
        if device == "cuda":
            cells.append(f"{r['mfu']:.1%}" if "mfu" in r else "–")
        for base, keys in ((trl, ("tok_s", "tok_cpu_s", "peak_gib")), (naive, ("tok_s", "tok_cpu_s"))):
            cells += [f"{r[k] / base[k]:.2f}×" if base else "–" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    for name, why in skipped.items():
        lines.append(f"| {name} | skipped: {why} |" + " |" * (len(cols) - 2))
    return "\n".join(lines)




def section_name(plugins: str, workload_name: str = "cpu") -> str:
    """RESULTS.md keeps one section per plugin set and workload: ``step_speed`` for dpo,
    ``step_speed_dpo_tr_soft_flipguard``, ``step_speed_long`` (``--workload long``) etc."""
    names = plugin_names(plugins)
    base = "step_speed" if names == ["dpo"] else "step_speed_" + "_".join(names)
    return base if workload_name in ("cpu", "cuda", "smoke") else f"{base}_{workload_name}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = spec_for(args)
    work = Path(args.work) / ("smoke" if args.smoke else "")
    if args.device == "cuda" and not args.smoke:
        work = Path(args.work) / "cuda"
    if spec is workload.LONG:
        work = Path(args.work) / "long"
    print(f"workload {spec.name} under {work} ...", flush=True)
    workload.ensure(spec, work)
    results, skipped = [], {}
    for name in args.rows:
        if name == "trl" and importlib.util.find_spec("trl") is None:
            skipped["trl"] = "TRL is not installed (pip install -e '.[bench]' installs trl 1.16)"
            print("row trl skipped: TRL is not installed; `pip install -e '.[bench]'` adds it", flush=True)
            continue
        print(f"row {name} ...", flush=True)
        result = run_trl_row(args, work, spec) if name == "trl" else run_aligner_row(args, ALIGNER_ROWS[name], work, spec)
        print(f"row {name}: {result['tok_s']:.0f} real tok/s, {result['pairs_s']:.2f} pairs/s, {result['peak_gib']:.2f} GiB, "
              f"step-1 loss {result['loss1']:.4f}, {result['wall_s']:.0f} s wall", flush=True)
        results.append(result)
    command = command_line(__file__, argv)
    load = os.getloadavg()
    header = (f"Command: `{command.strip()}`  \n"
              f"Workload `{spec.name}` ({spec.pairs} pairs, max length {spec.max_length}, {workload.describe(spec)}), "
              f"plugins `{args.plugins}`, "
              f"{args.nproc} ranks × {args.pairs} pairs, {args.steps} steps per row, first {args.warmup} left out. "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
              f"load average {load[0]:.1f} at the end."
              + (f" Reference updated every step in every row ({', '.join(update_every_step(args.plugins))}; "
                 f"TRL: ref_model_sync_steps=1)." if update_every_step(args.plugins) else ""))
    section = header + "\n\n" + table(results, skipped, args.device)
    print("\n" + section)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": results, "skipped": skipped, "ln2": math.log(2)}, indent=2))
    if not (args.smoke or args.no_write):
        write_section(Path(args.results), section_name(args.plugins, spec.name), section)
        print(f"\nwritten to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
