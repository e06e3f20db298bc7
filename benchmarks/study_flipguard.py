"""Does FlipGuard cut negative flips? DPO vs DPO+flipguard (vs +tr_soft) against the pre-aligned anchor.

FlipGuard's claim (DESIGN.md, second-hand from its paper): guarding the examples
the pre-aligned model already ranks right gives fewer negative flips (right
before, wrong after) at equal or better accuracy. On the embedded sort task:

1. Each method trains from ``embedded:tiny-sort`` (the SFT warm-up, which
   already solves part of the task) through the real launcher: 2 ZeRO-3 ranks
   on CPU, ``configs/tiny-cpu.yaml`` (its lr), a fixed number of steps, several seeds.
2. Every final model is scored by the same CLI, ``launch/eval.py --model
   <run>/final --anchor embedded:tiny-sort --data embedded:eval``: preference
   accuracy of policy and anchor, negative/positive flip rates (NFR/PFR) of the
   likelihood margin, and its generation judge (greedy generations scored by
   the gold reward: NFR/PFR and mean gold reward). Plain DPO has no anchor in
   training, so one CLI for all keeps the numbers computed identically.
3. It writes ``study_flipguard.csv``, prints a mean ± sd table over seeds and
   writes it with a reading into ``benchmarks/RESULTS.md``.

    python benchmarks/study_flipguard.py                      # the default study
    python benchmarks/study_flipguard.py --smoke --out /tmp/s # 2 steps, 1 seed (what CI runs)

``--cache-check`` adds one plain-DPO run with ``train.cache_static_logps=false``
(seed 0) and reports its median ``perf/step_time_s`` against the cached seed-0 run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_md, beside this script
from results_md import command_line, write_section  # noqa: E402

from aligner.launcher import deepspeed_command  # noqa: E402
from aligner.report import read_scalars  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
METHODS = {"dpo": "dpo", "dpo+flipguard": "dpo,flipguard", "dpo+tr_soft+flipguard": "dpo,tr_soft,flipguard"}
#: (csv column, path in launch/eval.py's json)
METRICS = [
    ("policy_accuracy", ("preference", "policy_accuracy")),
    ("anchor_accuracy", ("preference", "anchor_accuracy")),
    ("nfr", ("preference", "negative_flip_rate")),
    ("pfr", ("preference", "positive_flip_rate")),
    ("gen_nfr", ("generation", "negative_flip_rate")),
    ("gen_pfr", ("generation", "positive_flip_rate")),
    ("gen_policy_reward", ("generation", "policy_reward")),
    ("gen_anchor_reward", ("generation", "anchor_reward")),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--epsilon", type=float, default=None, help="flipguard.epsilon (default: the plugin's)")
    p.add_argument("--gamma", type=float, default=None, help="flipguard.gamma (default: the plugin's)")
    p.add_argument("--soft-every", type=int, default=8, help="tr_soft.every (τ)")
    p.add_argument("--cache-check", action="store_true",
                   help="also train plain DPO seed 0 without the static log-prob cache and compare step times")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "study_flipguard"))
    p.add_argument("--smoke", action="store_true", help="2 steps, 1 seed, τ = 1; writes no RESULTS.md section")
    args = p.parse_args(argv)
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if args.smoke:
        args.seeds, args.steps, args.soft_every = 1, 2, 1
    return args



def run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed: {shlex.join(cmd)}\n{proc.stderr[-3000:]}")


def train(method: str, seed: int, args: argparse.Namespace, out_dir: Path, cache: bool = True) -> None:
    sets = [f"output_dir={out_dir}", f"train.max_steps={args.steps}", f"train.save_every={args.steps}",
            f"train.seed={seed}", "data.eval=null", f"train.cache_static_logps={str(cache).lower()}"]
    if "flipguard" in method:
        sets += [f"flipguard.{k}={v}" for k, v in (("epsilon", args.epsilon), ("gamma", args.gamma)) if v is not None]
    if "tr_soft" in method:
        sets.append(f"tr_soft.every={args.soft_every}")
    run(deepspeed_command(["--config", str(ROOT / "configs" / "tiny-cpu.yaml"), "--plugins", METHODS[method],
                           "--overwrite", "--set", *sets]), f"training {method} seed {seed}")


def evaluate(run_dir: Path) -> dict[str, float]:
    out = run_dir / "regression_eval.json"
    run([sys.executable, str(ROOT / "launch" / "eval.py"), "--model", str(run_dir / "final"),
         "--anchor", "embedded:tiny-sort", "--data", "embedded:eval", "--out", str(out)], f"eval of {run_dir}")
    result = json.loads(out.read_text())
    return {col: float(result[a][b]) for col, (a, b) in METRICS}


def step_times(run_dir: Path) -> list[float]:
    """``perf/step_time_s`` of every logged step, read back from the run's TensorBoard events."""
    return [value for _, value in read_scalars(run_dir / "tensorboard")["perf/step_time_s"]]


def mean_sd(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / max(1, len(values) - 1))


def table(rows: list[dict], methods: list[str]) -> str:
    cols = [c for c, _ in METRICS]
    lines = ["| method | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for m in methods:
        sel = [r for r in rows if r["method"] == m]
        lines.append(f"| {m} | " + " | ".join("{:.3f} ± {:.3f}".format(*mean_sd([r[c] for r in sel])) for c in cols) + " |")
    return "\n".join(lines)


def verdict(rows: list[dict], methods: list[str]) -> str:
    """Each guarded method against plain DPO: NFR and accuracy gaps, judged against 2 standard errors of the difference."""
    if "dpo" not in methods:
        return "No plain-DPO baseline in this study, so nothing to compare against."
    base = [r for r in rows if r["method"] == "dpo"]
    out = []
    for m in methods:
        if m == "dpo":
            continue
        sel = [r for r in rows if r["method"] == m]
        parts = []
        for col, label in (("nfr", "preference NFR"), ("policy_accuracy", "preference accuracy"),
                           ("gen_nfr", "generation NFR"), ("gen_policy_reward", "gold reward")):
            (a, sa), (b, sb) = mean_sd([r[col] for r in sel]), mean_sd([r[col] for r in base])
            noise = 2 * math.sqrt(sa ** 2 / len(sel) + sb ** 2 / len(base))
            judged = "lower" if a - b < -noise else "higher" if a - b > noise else "no different"
            parts.append(f"{label} {a:.3f} vs {b:.3f} ({judged}; gap {a - b:+.3f}, band ±{noise:.3f})")
        out.append(f"{m} against dpo: " + ", ".join(parts) + ".")
    return " ".join(out)




def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from aligner.registry import available_plugins

    installed = available_plugins()
    methods = args.methods.split(",")
    for name in {p for m in methods for p in METHODS[m].split(",")}:
        if name not in installed:
            raise SystemExit(f"plugin '{name}' is not installed; installed: {', '.join(installed)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    started = time.time()
    for method in methods:
        for seed in range(args.seeds):
            run_dir = out / "runs" / f"{method}-seed{seed}"
            train(method, seed, args, run_dir, cache=not args.smoke)  # smoke: 2 steps, no full pre-pass
            rows.append({"method": method, "seed": seed, **evaluate(run_dir),
                         "median_step_time_s": statistics.median(step_times(run_dir))})
            print(f"{method} seed {seed}: done ({time.time() - started:.0f}s)", flush=True)
    with (out / "study_flipguard.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "seed", *[c for c, _ in METRICS], "median_step_time_s"])
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()})
    cache_note = ""
    if args.cache_check and "dpo" in methods:
        nocache = out / "runs" / "dpo-seed0-nocache"
        train("dpo", 0, args, nocache, cache=False)
        with_cache = next(r["median_step_time_s"] for r in rows if r["method"] == "dpo" and r["seed"] == 0)
        without = statistics.median(step_times(nocache))
        cache_note = (f"Static log-prob cache: plain DPO seed 0 median perf/step_time_s {with_cache:.3f} s with "
                      f"train.cache_static_logps, {without:.3f} s without (ratio with/without {with_cache / without:.2f}).")
        print(cache_note)
    text = table(rows, methods)
    found = verdict(rows, methods)
    print(text)
    print(found)
    command = command_line(__file__, argv)
    if not args.smoke:
        write_section(RESULTS, "study_flipguard",
            "## FlipGuard study: negative flips against the pre-aligned anchor (embedded sort task)\n\n"
            f"Command: `{command.strip()}` ({args.seeds} seeds, {args.steps} steps, configs/tiny-cpu.yaml lr, "
            f"flipguard ε={args.epsilon if args.epsilon is not None else 'default'} "
            f"γ={args.gamma if args.gamma is not None else 'default'}, tr_soft τ={args.soft_every}; "
            f"{time.time() - started:.0f} s on this machine). Every final model is scored by `launch/eval.py --anchor "
            "embedded:tiny-sort --data embedded:eval`: accuracy and NFR/PFR of the preference margin, and gen_* "
            "from its generation judge (greedy generations scored by the gold reward). Mean ± sd over seeds.\n\n"
            + text + "\n\n**What it shows.** " + found + (f"\n\n{cache_note}" if cache_note else "") + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
