"""Does FlipGuard cut negative flips, and at which γ and ε? DPO vs DPO+flipguard (vs +tr_soft) against the anchor.

FlipGuard's claim (DESIGN.md, second-hand from its paper): guarding the examples
the pre-aligned model already ranks right gives fewer negative flips (right
before, wrong after) at equal or better accuracy. The paper's γ and ε were not
found (DESIGN.md), so the study sweeps them. On the embedded sort task:

1. Each run trains from ``embedded:tiny-sort`` (the SFT warm-up, which already
   solves part of the task) through the real trainer, ``launch/train.py`` with
   ``configs/tiny-cpu.yaml`` (its lr), as one process (one rank, a ZeRO-3 engine
   with world size 1) with 16 pairs per step, the global batch of the config's
   2 × 8 pairs. The runs: plain DPO, DPO+flipguard at every γ ∈ ``--gammas`` ×
   ε ∈ ``--epsilons``, and DPO+tr_soft+flipguard at the plugin's defaults;
   ``--seeds`` seeds each.
2. Every final model is scored by the same CLI, ``launch/eval.py --model
   <run>/final --anchor embedded:tiny-sort --data embedded:eval``: preference
   accuracy of policy and anchor, negative/positive flip rates (NFR/PFR) of the
   likelihood margin, and its generation judge (greedy generations scored by
   the gold reward: NFR/PFR and mean gold reward). Plain DPO has no anchor in
   training, so one CLI for all keeps the numbers computed identically.
3. Each method is compared with plain DPO: the difference of seed means with a
   95 % bootstrap interval over seeds (``study_stats.py``). A difference is
   "lower"/"higher" only when the whole interval is on one side of 0.
4. It writes ``study_flipguard.csv``, a γ × ε figure, and the tables with a
   reading into ``benchmarks/RESULTS.md``.

A run whose ``regression_eval.json`` matches its settings is not trained again,
so the study can be completed in pieces.

    python benchmarks/study_flipguard.py                      # the default study
    python benchmarks/study_flipguard.py --smoke --out /tmp/s # 2 steps, 1 seed, 1 cell (what CI runs)

``--cache-check`` adds one plain-DPO run with ``train.cache_static_logps=false``
(seed 0) and reports its median ``perf/step_time_s`` against the cached seed-0 run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_md, study_stats, beside this script
from results_md import command_line, write_section  # noqa: E402

import numpy as np  # noqa: E402

import study_stats as stats  # noqa: E402
from aligner.evaluation.report import read_scalars  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
PLUGINS = {"dpo": "dpo", "dpo+flipguard": "dpo,flipguard", "dpo+tr_soft+flipguard": "dpo,tr_soft,flipguard"}
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
#: what each method is compared on, and which direction is the claimed one
VERDICT_METRICS = [("nfr", "preference NFR"), ("gen_nfr", "generation NFR"),
                   ("policy_accuracy", "preference accuracy"), ("gen_policy_reward", "gold reward")]
PAIRS_PER_STEP = 16  # configs/tiny-cpu.yaml's 8 pairs per rank × 2 ranks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(PLUGINS), help=f"comma-separated, of: {', '.join(PLUGINS)}")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--gammas", default="0.3,1,3", help="flipguard.gamma values of the sweep (DPO+flipguard)")
    p.add_argument("--epsilons", default="0.001,0.01,0.1", help="flipguard.epsilon values of the sweep (DPO+flipguard)")
    p.add_argument("--soft-every", type=int, default=8, help="tr_soft.every (τ)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once")
    p.add_argument("--cache-check", action="store_true",
                   help="also train plain DPO seed 0 without the static log-prob cache and compare step times")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "study_flipguard"))
    p.add_argument("--report-only", action="store_true", help="train nothing: the tables from the runs that finished")
    p.add_argument("--smoke", action="store_true", help="2 steps, 1 seed, one γ and ε, τ = 1; writes no RESULTS.md section")
    args = p.parse_args(argv)
    unknown = [m for m in args.methods.split(",") if m not in PLUGINS]
    if unknown:
        p.error(f"--methods: unknown method {unknown[0]!r}; choose from {', '.join(PLUGINS)}")
    try:
        args.gammas = [float(g) for g in args.gammas.split(",") if g]
        args.epsilons = [float(e) for e in args.epsilons.split(",") if e]
    except ValueError as exc:
        p.error(f"--gammas/--epsilons: {exc}; give comma-separated numbers such as 0.3,1,3")
    if args.smoke:
        args.seeds, args.steps, args.soft_every, args.jobs = 1, 2, 1, 1
        args.gammas, args.epsilons = args.gammas[:1], args.epsilons[:1]
    return args


def cells(args: argparse.Namespace) -> list[tuple[str, float | None, float | None]]:
    """(method, γ, ε) of every cell, None being the plugin's default, in the order they run: plain DPO, the
    grid's centre (the plugin's defaults with the default grids), the other methods, the rest of the centre's
    row and column (one factor at a time), then the corners; a study stopped part-way has whole cells."""
    methods = args.methods.split(",")
    grid = [("dpo+flipguard", g, e) for g in args.gammas for e in args.epsilons] if "dpo+flipguard" in methods else []
    centre = grid[len(grid) // 2: len(grid) // 2 + 1]
    cross = [c for c in grid if c not in centre and (c[1] == centre[0][1] or c[2] == centre[0][2])]
    others = [(m, None, None) for m in methods if m not in ("dpo", "dpo+flipguard")]
    return ([("dpo", None, None)] * ("dpo" in methods) + centre + others + cross
            + [c for c in grid if c not in centre + cross])
def cell_name(method: str, gamma: float | None, epsilon: float | None) -> str:
    return method if gamma is None else f"{method}-g{gamma:g}-e{epsilon:g}"


def run(cmd: list[str], what: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("RANK", None)  # one rank of its own, whatever launched this script
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed: {shlex.join(cmd)}\n{proc.stderr[-3000:]}")


def train(method: str, gamma, epsilon, seed: int, args: argparse.Namespace, out_dir: Path, cache: bool = True) -> None:
    sets = [f"output_dir={out_dir}", f"train.max_steps={args.steps}", f"train.save_every={args.steps}",
            f"train.seed={seed}", f"train.micro_batch_size={PAIRS_PER_STEP}", "data.eval=null",
            f"train.cache_static_logps={str(cache).lower()}"]
    if gamma is not None:
        sets += [f"flipguard.gamma={gamma}", f"flipguard.epsilon={epsilon}"]
    if "tr_soft" in method:
        sets.append(f"tr_soft.every={args.soft_every}")
    run([sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "tiny-cpu.yaml"),
         "--plugins", PLUGINS[method], "--overwrite", "--set", *sets], f"training {cell_name(method, gamma, epsilon)} seed {seed}")


def evaluate(run_dir: Path) -> dict[str, float]:
    out = run_dir / "regression_eval.json"
    run([sys.executable, str(ROOT / "launch" / "eval.py"), "--model", str(run_dir / "final"),
         "--anchor", "embedded:tiny-sort", "--data", "embedded:eval", "--out", str(out)], f"eval of {run_dir}")
    result = json.loads(out.read_text())
    return {col: float(result[a][b]) for col, (a, b) in METRICS}


def step_times(run_dir: Path) -> list[float]:
    """``perf/step_time_s`` of every logged step, read back from the run's TensorBoard events."""
    return [value for _, value in read_scalars(run_dir / "tensorboard")["perf/step_time_s"]]


def signature(cell: tuple, seed: int, args: argparse.Namespace) -> dict:
    """What a finished run must match to be reused."""
    return {"cell": list(cell), "seed": seed, "steps": args.steps, "pairs_per_step": PAIRS_PER_STEP,
            "soft_every": args.soft_every if "tr_soft" in cell[0] else None}


def finished(cell: tuple, seed: int, args: argparse.Namespace, out: Path) -> dict | None:
    """The run's row when a previous invocation finished it with these settings."""
    done_file = out / "runs" / f"{cell_name(*cell)}-seed{seed}" / "study_run.json"
    if done_file.is_file() and (done := json.loads(done_file.read_text())).get("signature") == signature(cell, seed, args):
        return done["row"]
    return None


def one_run(cell: tuple, seed: int, args: argparse.Namespace, out: Path) -> dict:
    """Train and evaluate one run, or read it back when a previous invocation finished it with these settings."""
    method, gamma, epsilon = cell
    run_dir = out / "runs" / f"{cell_name(*cell)}-seed{seed}"
    if (row := finished(cell, seed, args, out)) is not None:
        return row
    done_file = run_dir / "study_run.json"
    t0 = time.time()
    train(method, gamma, epsilon, seed, args, run_dir, cache=not args.smoke)  # smoke: 2 steps, no full pre-pass
    row = {"method": cell_name(*cell), "gamma": gamma, "epsilon": epsilon, "seed": seed, **evaluate(run_dir),
           "median_step_time_s": statistics.median(step_times(run_dir)), "run_s": round(time.time() - t0, 1)}
    done_file.write_text(json.dumps({"signature": signature(cell, seed, args), "row": row}))
    print(f"{cell_name(*cell)} seed {seed}: done ({row['run_s']:.0f} s)", flush=True)
    return row


def per_method(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["method"], []).append(r)
    return out


def mean_sd(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def table(rows: list[dict]) -> str:
    cols = [c for c, _ in METRICS]
    lines = ["| method | seeds | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for m, sel in per_method(rows).items():
        lines.append(f"| {m} | {len(sel)} | " + " | ".join("{:.3f} ± {:.3f}".format(*mean_sd([r[c] for r in sel]))
                                                         for c in cols) + " |")
    return "\n".join(lines)


def differences(rows: list[dict]) -> dict[str, dict[str, tuple[float, float, float]]] | None:
    """method -> metric -> (Δ of seed means against plain DPO, 95 % bootstrap interval); None without plain DPO."""
    groups = per_method(rows)
    base = groups.get("dpo")
    if base is None:
        return None
    mean = lambda runs: float(runs.mean())  # noqa: E731
    return {m: {col: stats.bootstrap_diff(mean, np.array([r[col] for r in sel]), np.array([r[col] for r in base]))
                for col, _ in VERDICT_METRICS}
            for m, sel in groups.items() if m != "dpo"}


def diff_table(diffs: dict | None) -> str:
    lines = ["| method − dpo | " + " | ".join(f"Δ {label} [95% CI]" for _, label in VERDICT_METRICS) + " |",
             "|" + "---|" * (len(VERDICT_METRICS) + 1)]
    for m, d in (diffs or {}).items():
        lines.append(f"| {m} | " + " | ".join(f"{stats.fmt(*d[col], signed=True)} ({stats.compare_word(*d[col][1:]).split(' (')[0]})"
                                               for col, _ in VERDICT_METRICS) + " |")
    return "\n".join(lines)


def verdict(diffs: dict | None) -> str:
    """The claim, per method: fewer negative flips (NFR lower) at equal or better accuracy and gold reward.

    Supported when an NFR interval is below 0 and neither accuracy nor gold reward is lower (its interval
    wholly below 0); refuted when NFR is higher or accuracy/gold lower with NFR not lower; else not resolved.
    """
    if diffs is None:
        return "No plain-DPO baseline in this study, so nothing to compare against."
    if not diffs:
        return "No finished method to compare with plain DPO yet."
    out = []
    for m, d in diffs.items():
        words = {col: stats.compare_word(*d[col][1:]).split(" (")[0] for col, _ in VERDICT_METRICS}
        fewer = words["nfr"] == "lower" or words["gen_nfr"] == "lower"
        more = words["nfr"] == "higher" or words["gen_nfr"] == "higher"
        worse = words["policy_accuracy"] == "lower" or words["gen_policy_reward"] == "lower"
        claim = ("supported" if fewer and not more and not worse else "refuted" if (more or worse) and not fewer
                 else "not resolved at this budget")
        parts = ", ".join(f"{label} {words[col]} ({stats.fmt(*d[col], signed=True)})" for col, label in VERDICT_METRICS)
        out.append(f"{m}: {claim}: {parts}.")
    return " ".join(out)


def plot(rows: list[dict], args: argparse.Namespace, out: Path) -> Path | None:
    """Seed means of generation NFR and gold reward over the γ × ε grid, with plain DPO's for reference."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install -e .[report])")
        return None
    groups = per_method(rows)
    if not any(m.startswith("dpo+flipguard-") for m in groups):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    base = groups.get("dpo", [])
    for ax, (col, label) in zip(axes, (("gen_nfr", "generation NFR"), ("gen_policy_reward", "gold reward"))):
        grid = np.full((len(args.gammas), len(args.epsilons)), np.nan)
        for i, g in enumerate(args.gammas):
            for j, e in enumerate(args.epsilons):
                sel = groups.get(cell_name("dpo+flipguard", g, e), [])
                if sel:
                    grid[i, j] = np.mean([r[col] for r in sel])
        ref = f"; dpo {np.mean([r[col] for r in base]):.3f}" if base else ""
        im = stats.heatmap(ax, grid, [f"{e:g}" for e in args.epsilons], [f"{g:g}" for g in args.gammas],
                           "flipguard.epsilon", "flipguard.gamma", f"dpo+flipguard {label} (seed mean{ref})")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = out / "flipguard_sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from aligner.registry import available_plugins

    installed = available_plugins()
    for name in {p for m in args.methods.split(",") for p in PLUGINS[m].split(",")}:
        if name not in installed:
            raise SystemExit(f"plugin '{name}' is not installed; installed: {', '.join(installed)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if not args.report_only:
        jobs = [(c, s) for c in cells(args) for s in range(args.seeds)]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda cs: one_run(cs[0], cs[1], args, out), jobs))
    rows, missing = [], []
    for c in cells(args):  # whole cells only: a cell enters the tables with all its seeds
        done = [finished(c, s, args, out) for s in range(args.seeds)]
        if any(d is None for d in done):
            missing.append(f"{cell_name(*c)} ({sum(d is not None for d in done)}/{args.seeds} seeds)")
        else:
            rows += done
    rerun = command_line(__file__, [a for a in (sys.argv[1:] if argv is None else argv) if a != "--report-only"])
    not_finished = (f"**Not finished:** {', '.join(missing)}; `{rerun}` completes them (finished runs are skipped)."
                    if missing else "**Complete:** every cell at every seed.")
    with (out / "study_flipguard.csv").open("w", newline="") as f:
        fields = ["method", "gamma", "epsilon", "seed", *[c for c, _ in METRICS], "median_step_time_s", "run_s"]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()})
    cache_note = ""
    if args.cache_check and "dpo" in args.methods.split(","):
        nocache = out / "runs" / "dpo-seed0-nocache"
        train("dpo", None, None, 0, args, nocache, cache=False)
        with_cache = next(r["median_step_time_s"] for r in rows if r["method"] == "dpo" and r["seed"] == 0)
        without = statistics.median(step_times(nocache))
        cache_note = (f"Static log-prob cache: plain DPO seed 0 median perf/step_time_s {with_cache:.3f} s with "
                      f"train.cache_static_logps, {without:.3f} s without (ratio with/without {with_cache / without:.2f}).")
        print(cache_note)
    diffs = differences(rows)
    text, dtext, found = table(rows), diff_table(diffs), verdict(diffs)
    figure = plot(rows, args, out)
    print(text, dtext, found, not_finished, sep="\n\n")
    command = command_line(__file__, argv)
    if not args.smoke:
        write_section(RESULTS, "study_flipguard",
            "## FlipGuard study: negative flips against the pre-aligned anchor, γ × ε sweep (embedded sort task)\n\n"
            f"Command: `{command.strip()}` ({args.seeds} seeds, {args.steps} steps, configs/tiny-cpu.yaml lr, "
            f"{PAIRS_PER_STEP} pairs per step on 1 rank; dpo+flipguard at γ ∈ {{{', '.join(f'{g:g}' for g in args.gammas)}}} "
            f"× ε ∈ {{{', '.join(f'{e:g}' for e in args.epsilons)}}}, dpo+tr_soft+flipguard at the plugin defaults with "
            f"τ={args.soft_every}; wall time of this invocation {time.time() - started:.0f} s; the {len(rows)} runs in the tables "
            f"took {sum(r['run_s'] for r in rows):.0f} s of wall time, counted one by one). Every final model is scored "
            "by `launch/eval.py --anchor embedded:tiny-sort --data embedded:eval`: accuracy and NFR/PFR of the preference "
            "margin, and gen_* from its generation judge (greedy generations scored by the gold reward). Mean ± sd over "
            "seeds.\n\n" + text + "\n\n**Against plain DPO** (difference of seed means, 95% bootstrap interval over seeds; "
            "a direction only when the interval excludes 0):\n\n" + dtext + "\n\n**What it shows.** " + found
            + (f"\n\n{cache_note}" if cache_note else "") + "\n\n" + not_finished
            + (f"\n\n![{figure.stem}]({figure.relative_to(RESULTS.parent)})" if figure and figure.is_relative_to(RESULTS.parent) else "")
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
