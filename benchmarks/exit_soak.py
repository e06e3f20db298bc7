"""Exit soak: short 2-rank runs in a row under CPU load, per exit path, counting those that do not end as they should.

The crash (``terminate called without an active exception`` at exit, exit code 250 =
SIGABRT through DeepSpeed's launcher) was a teardown race: first seen on the clean
path, then on the error paths, where each rank left the process group alone.
aligner/training/teardown.py now ends every path the same way. This loop is the evidence:
each case is one exit path of the embedded config, a few steps, started through the
DeepSpeed launcher while ``--load`` busy processes compete for the cores:

- ``clean``: ``--plugins simpo``, a checkpoint and the export; exit 0;
- ``data-error``: a mixture entry with a negative fraction, refused on every rank
  (aligner/distributed/lockstep.py shares it); exit 2;
- ``rank0-error``: ``output_dir`` under a regular file, which only rank 0 checks; exit 2;
- ``nonfinite``: a NaN loss on rank 1 at step 2 (tests/plugin_fixtures/faults.py); exit 3;
- ``preempted``: SIGUSR1 to rank 1 after step 2: the checkpoint, then exit 5.

A run fails when its exit code is not the case's, or its output holds ``terminate called``
or a ``Traceback``. ``--max-minutes`` stops starting runs after that long; the table then
says how many ran. The cases take turns, so load changes hit them alike.

    python benchmarks/exit_soak.py --cases clean --runs 30 --load 2
    python benchmarks/exit_soak.py --cases data-error,rank0-error,nonfinite,preempted --runs 40 --section exit_soak_errors
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import command_line, free_port, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAULTS = "dpo,plugin_fixtures.faults:faults"
#: case -> (plugins, overrides given the run's folder, expected exit code)
CASES = {
    "clean": (None, lambda out: [], 0),
    "data-error": ("dpo", lambda out: ["data.train=[{path: embedded:train, samples: -0.5}]"], 2),
    "rank0-error": ("dpo", lambda out: [f"output_dir={out / 'notes.txt' / 'run'}"], 2),
    "nonfinite": (FAULTS, lambda out: ["faults.nan_loss_at=2", "faults.nan_rank=1", "data.eval=null"], 3),
    "preempted": (FAULTS, lambda out: ["faults.signal_at_step=2"], 5),
}


def burn(stop_at: float) -> None:
    while time.time() < stop_at:
        sum(i * i for i in range(10_000))


def one_run(out: Path, case: str, plugins: str, steps: int) -> tuple[int, str, float]:
    case_plugins, overrides, _ = CASES[case]
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("a regular file")  # for rank0-error
    deepspeed = Path(sys.executable).with_name("deepspeed")
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "launch" / "train.py"),
           "--plugins", case_plugins or plugins, "--set", f"output_dir={out / 'run'}", f"train.max_steps={steps}",
           "eval.every=0", *overrides(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - started


def failure_line(text: str) -> str:
    return next((line for line in text.splitlines() if "terminate called" in line or "Error" in line
                 or "Traceback" in line), "")[:200]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="clean", help=f"comma-separated, of {', '.join(CASES)} (default: clean)")
    p.add_argument("--runs", type=int, default=30, help="runs in all, the cases taking turns")
    p.add_argument("--load", type=int, default=2, help="busy processes competing for the CPU during the loop")
    p.add_argument("--plugins", default="simpo", help="the clean case's plugins")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--max-minutes", type=float, default=0, help="stop starting runs after this long (0: no limit)")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    p.add_argument("--section", default="exit_soak", help="the RESULTS.md section to write (default: %(default)s)")
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        p.error(f"--cases: unknown {', '.join(unknown) or 'none given'}; the cases are {', '.join(CASES)}")
    burners = [mp.Process(target=burn, args=(time.time() + 3600,), daemon=True) for _ in range(args.load)]
    for b in burners:
        b.start()
    done: dict[str, list[float]] = {c: [] for c in cases}
    failures: list[tuple[str, int, int, str]] = []
    loads: list[float] = []
    deadline = time.monotonic() + args.max_minutes * 60 if args.max_minutes else float("inf")
    try:
        with tempfile.TemporaryDirectory(prefix="exit-soak-") as tmp:
            for i in range(args.runs):
                if time.monotonic() > deadline:
                    break
                case = cases[i % len(cases)]
                loads.append(os.getloadavg()[0])
                code, text, wall = one_run(Path(tmp) / f"run{i}", case, args.plugins, args.steps)
                done[case].append(wall)
                bad = code != CASES[case][2] or "terminate called" in text or "Traceback" in text
                if bad:
                    failures.append((case, i, code, failure_line(text)))
                print(f"run {i + 1}/{args.runs} ({case}): exit {code}, {wall:.1f} s{' FAILED' if bad else ''}", flush=True)
    finally:
        for b in burners:
            b.terminate()
    rows = [f"Command: `{command_line(__file__, argv)}`", "",
            f"1-min load average during the loop: {min(loads):.1f}-{max(loads):.1f} (2 cores), {args.load} busy "
            f"processes added; {sum(map(len, done.values()))} runs done of {args.runs} asked.", "",
            "| case | expected exit | runs | failed | median wall s/run |", "|---|---|---|---|---|"]
    for case, walls in done.items():
        n_failed = sum(1 for f in failures if f[0] == case)
        median = f"{sorted(walls)[len(walls) // 2]:.1f}" if walls else "-"
        rows.append(f"| {case}{f' (`{args.plugins}`)' if case == 'clean' else ''} | {CASES[case][2]} | {len(walls)} | "
                    f"{n_failed} | {median} |")
    rows += [f"- run {i} ({case}): exit {code}: `{line}`" for case, i, code, line in failures]
    table = "\n".join(rows)
    print(table)
    write_section(args.results, args.section, table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
