#!/usr/bin/env python
"""Where a step's time goes: step_speed's rows under ``torch.profiler``, ops grouped into terms, side by side.

    python benchmarks/profile_step.py --rows naive,fast            # the CPU yardstick, 2 ranks, dpo
    python benchmarks/profile_step.py --rows fast --plugins dpo,tr_soft,flipguard

Each row runs as in ``benchmarks/step_speed.py`` (same workload, batches and launcher) with the
benchmark-only plugin ``benchmarks/profile_plugin.py`` added; it profiles steps ``--start + 1`` to
``--start + --steps``. Per row and rank, the self CPU seconds per step of every op are summed into terms:

- ``matmul``: ``aten::mm``/``addmm``/``bmm`` (the linear layers and the LM head);
- ``attention``: the SDPA kernels, forward and backward;
- ``elementwise``: every other ``aten::`` op: exp, sub, log-softmax, gather, the optimizer's arithmetic...
  (most of it on the (tokens × vocabulary) logits);
- ``copies``: copy, cat, fill and zero (ZeRO-3's gathered and partitioned parameters, gradient buckets);
- ``other``: the self time of non-aten ranges (autograd nodes, DeepSpeed's hooks): Python glue;
- ``not in ops``: the slowest rank's step time minus this rank's op time: waiting for gloo's collectives
  (and for the other rank, when it has more tokens), and Python.

The table goes to stdout and, with ``--write``, into ``benchmarks/RESULTS.md`` (section ``profile_step``, or ``profile_step_<plugins>`` for another plugin set).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import step_speed  # noqa: E402
import workload  # noqa: E402
from results_md import command_line, write_section  # noqa: E402

MATMUL = {"mm", "addmm", "bmm", "baddbmm"}
COPIES = {"copy", "cat", "fill", "zero", "clone", "_to_copy", "narrow_copy", "index_put"}
TERMS = ("matmul", "attention", "elementwise", "copies", "other")


def term_of(op: str) -> str:
    base = op.removeprefix("aten::").rstrip("_")
    if "scaled_dot_product" in op:
        return "attention"
    if not op.startswith("aten::"):
        return "other"  # autograd nodes, DeepSpeed and gloo ranges: their self time is Python glue and waiting
    return "matmul" if base in MATMUL else "copies" if base in COPIES else "elementwise"


def split_terms(rows: list[dict]) -> dict[str, float]:
    """Self CPU seconds per step of the ops (autograd-node rows included: their self time is Python glue)."""
    out = dict.fromkeys(TERMS, 0.0)
    for r in rows:
        out[term_of(r["name"])] += r["self_cpu_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="naive,fast", help="step_speed rows: " + ",".join(step_speed.ALIGNER_ROWS))
    p.add_argument("--plugins", default="dpo")
    p.add_argument("--start", type=int, default=2, help="warm-up steps before the profiled window")
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--work", default=step_speed.parse_args([]).work)
    p.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in step_speed.ALIGNER_ROWS]
    if unknown:
        p.error(f"--rows: unknown row(s) {', '.join(unknown)}; choose from {', '.join(step_speed.ALIGNER_ROWS)}")
    if args.start < 1 or args.steps < 1:
        p.error(f"--start and --steps must be >= 1, got {args.start} and {args.steps}")
    bench = step_speed.parse_args(["--plugins", args.plugins + ",profile_plugin:profiler", "--steps",
                                   str(args.start + args.steps + 1), "--warmup", "0", "--work", args.work])
    spec = workload.CPU
    work = Path(args.work)
    workload.ensure(spec, work)
    env = step_speed.run_env(bench)
    env["PYTHONPATH"] = ":".join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    lines = []
    cols = ["row", "rank", "step s", *TERMS, "not in ops", "top op"]
    for name in rows:
        row = step_speed.Row(f"profile_{name}", step_speed.ALIGNER_ROWS[name].sets)
        cmd = step_speed.aligner_command(bench, row, work, spec) + [f"profile.start={args.start}",
                                                                     f"profile.steps={args.steps}"]
        print(f"row {name} ...", flush=True)
        proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"row {name} failed:\n{shlex.join(cmd)}\n{proc.stderr[-3000:]}")
        out = work / "runs" / row.name
        scalars = step_speed.read_scalars(out / "tensorboard")
        window = [v for s, v in scalars["perf/step_time_s"] if args.start < s <= args.start + args.steps]
        step_s = sum(window) / len(window)
        for rank_file in sorted((out / "profile").glob("rank*.json")):
            rows = json.loads(rank_file.read_text())["rows"]
            terms = split_terms(rows)
            top = max(rows, key=lambda r: r["self_cpu_s"])
            cells = [name, rank_file.stem.removeprefix("rank"), f"{step_s:.2f}",
                     *(f"{v:.2f}" for v in terms.values()), f"{step_s - sum(terms.values()):.2f}",
                     f"{top['name']} {top['self_cpu_s']:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
    command = command_line(__file__, argv)
    text = (f"Command: `{command.strip()}`. Plugins `{args.plugins}`; seconds per step (mean of steps "
            f"{args.start + 1}–{args.start + args.steps}); each term is that rank's self CPU time in those ops.\n\n"
            + "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n" + "\n".join(lines))
    print("\n" + text)
    if args.write:
        write_section(HERE / "RESULTS.md", step_speed.section_name(args.plugins).replace("step_speed", "profile_step"), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
