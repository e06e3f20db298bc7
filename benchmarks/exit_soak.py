"""Exit soak: N short 2-rank runs in a row under CPU load, counting those that do not end cleanly.

The issue's crash (``terminate called without an active exception`` at exit) was a
teardown race seen once under load; aligner/teardown.py fixes the shutdown order.
This loop is the evidence: each run is the embedded config with ``--plugins simpo``
(the issue's command), a few steps, a checkpoint and the export, while ``--load``
busy processes compete for the cores. A run fails when its exit code is not 0 or its
output holds ``terminate called`` or a ``Traceback``. ``--max-minutes`` stops starting
runs after that long; the table then says how many ran.

    python benchmarks/exit_soak.py --runs 30 --load 2
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


def burn(stop_at: float) -> None:
    while time.time() < stop_at:
        sum(i * i for i in range(10_000))


def one_run(out: Path, plugins: str, steps: int) -> tuple[int, str, float]:
    deepspeed = Path(sys.executable).with_name("deepspeed")
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "launch" / "train.py"),
           "--plugins", plugins, "--set", f"output_dir={out}", f"train.max_steps={steps}", "eval.every=0"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--load", type=int, default=2, help="busy processes competing for the CPU during the loop")
    p.add_argument("--plugins", default="simpo")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--max-minutes", type=float, default=0, help="stop starting runs after this long (0: no limit)")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = p.parse_args(argv)
    burners = [mp.Process(target=burn, args=(time.time() + 3600,), daemon=True) for _ in range(args.load)]
    for b in burners:
        b.start()
    failures, walls, loads = [], [], []
    deadline = time.monotonic() + args.max_minutes * 60 if args.max_minutes else float("inf")
    try:
        with tempfile.TemporaryDirectory(prefix="exit-soak-") as tmp:
            for i in range(args.runs):
                if time.monotonic() > deadline:
                    break
                loads.append(os.getloadavg()[0])
                code, text, wall = one_run(Path(tmp) / f"run{i}", args.plugins, args.steps)
                walls.append(wall)
                bad = code != 0 or "terminate called" in text or "Traceback" in text
                if bad:
                    failures.append((i, code, next((l for l in text.splitlines() if "terminate called" in l
                                                    or "Error" in l), "")[:200]))
                print(f"run {i + 1}/{args.runs}: exit {code}, {wall:.1f} s{' FAILED' if bad else ''}", flush=True)
    finally:
        for b in burners:
            b.terminate()
    rows = [f"Command: `{command_line(__file__, argv)}`", "",
            "| runs done (asked) | busy processes added | 1-min load average (min-max, 2 cores) | plugins | steps per run "
            "| failed | median wall s/run |", "|---|---|---|---|---|---|---|",
            f"| {len(walls)} ({args.runs}) | {args.load} | {min(loads):.1f}-{max(loads):.1f} | `{args.plugins}` | "
            f"{args.steps} | {len(failures)} | {sorted(walls)[len(walls) // 2]:.1f} |"]
    rows += [f"- run {i}: exit {code}: `{line}`" for i, code, line in failures]
    table = "\n".join(rows)
    print(table)
    write_section(args.results, "exit_soak", table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
