"""What the checkpoint digests cost: xxh3-128 against BLAKE2b, beside the save they are part of.

Two measurements, side by side in one run:

1. **The CPU yardstick** (benchmarks/workload.py ``CPU``, 19M parameters): a real 2-rank
   ZeRO-3 run that saves after every step. Each save logs its wall time and the part spent
   digesting (``saved checkpoint …: … in T s, of which D s digesting``, aligner/training/checkpoint.py);
   the table gives their medians. Then BLAKE2b and xxh3 are timed over that run's last
   checkpoint's files, read from the page cache as during a save.
2. **1 GiB**: one fp32 tensor of 1 GiB written with ``torch.save`` and fsynced (what a save
   does per file), then digested from the page cache by each algorithm, and once more by xxh3
   with the page cache dropped for that file (what ``--resume`` pays on a cold start).

    python benchmarks/checkpoint_digest.py
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload  # noqa: E402
from results_md import command_line, write_section  # noqa: E402

from aligner.training import checkpoint  # noqa: E402
from aligner.training.launcher import deepspeed_command  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAVED = re.compile(r"saved checkpoint \S+: ([\d,]+) bytes \([\d.]+ MiB\) in ([\d.]+) s, of which ([\d.]+) s digesting")


def blake2b_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    buffer = bytearray(checkpoint.READ_BYTES)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            h.update(view[:n])
    return h.hexdigest()


def timed(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def yardstick(work: Path, steps: int) -> dict:
    spec = workload.CPU
    work = workload.ensure(spec, work)
    out = work / "runs" / "digest"
    sets = [f"output_dir={out}", f"model.name_or_path={work / 'model'}", f"data.train={work / 'data' / 'prefs.jsonl'}",
            "data.eval=null", f"data.max_length={spec.max_length}", "data.shuffle=false", f"train.max_steps={steps}",
            "train.micro_batch_size=4", "train.save_every=1", "eval.every=0", "train.cache_static_logps=false"]
    cmd = deepspeed_command(["--config", "configs/tiny-cpu.yaml", "--plugins", "dpo", "--overwrite", "--set", *sets], 2)
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"the yardstick run failed:\n{proc.stderr[-3000:]}")
    saves = [(int(b.replace(",", "")), float(t), float(d)) for b, t, d in SAVED.findall(proc.stderr)]
    files = [p for p in checkpoint.list_checkpoints(out)[-1].rglob("*") if p.is_file()]
    for p in files:  # into the page cache, as right after a save
        p.read_bytes()
    return {"what": f"CPU yardstick, 2 ranks ZeRO-3, {len(saves)} saves", "bytes": saves[-1][0],
            "save_s": statistics.median(t for _, t, _ in saves), "xxh3_in_save_s": statistics.median(d for *_, d in saves),
            "xxh3_s": sum(timed(checkpoint.file_digest, p) for p in files),
            "blake2b_s": sum(timed(blake2b_digest, p) for p in files), "cold_s": None}


def one_gib(folder: Path, repeats: int) -> dict:
    path = folder / "one_gib.pt"
    rows = []
    for _ in range(repeats):
        tensor = torch.randn(2**28)  # 2^28 fp32 = 1 GiB
        started = time.perf_counter()
        torch.save({"w": tensor}, path)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        save_s = time.perf_counter() - started
        del tensor
        xxh3_s, blake_s = timed(checkpoint.file_digest, path), timed(blake2b_digest, path)
        drop_cache(path)
        rows.append((save_s, xxh3_s, blake_s, timed(checkpoint.file_digest, path)))
        path.unlink()
    med = [statistics.median(r[i] for r in rows) for i in range(4)]
    return {"what": f"1 GiB, torch.save + fsync, one process, median of {repeats}", "bytes": 2**30 + 1000,
            "save_s": med[0], "xxh3_in_save_s": med[1], "xxh3_s": med[1], "blake2b_s": med[2], "cold_s": med[3]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6, help="yardstick steps (one save each)")
    p.add_argument("--repeats", type=int, default=3, help="1 GiB rounds")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "aligner-yardstick-cpu")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    load = [os.getloadavg()[0]]
    results = [yardstick(args.workdir, args.steps)]
    load.append(os.getloadavg()[0])
    with tempfile.TemporaryDirectory(prefix="digest-", dir=args.workdir) as tmp:
        results.append(one_gib(Path(tmp), args.repeats))
    load.append(os.getloadavg()[0])
    rows = [f"Command: `{command_line(__file__, argv)}` ({time.strftime('%Y-%m-%d', time.gmtime())}; 1-min load average "
            f"{min(load):.1f}-{max(load):.1f} on 2 cores)", "",
            "| checkpoint | bytes | save s | xxh3 s in the save | xxh3 / save | xxh3 s (warm) | BLAKE2b s (warm) | "
            "BLAKE2b / save | xxh3 s, cold cache (resume) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        cold = f"{r['cold_s']:.3f}" if r["cold_s"] is not None else "-"
        rows.append(f"| {r['what']} | {r['bytes']:,} | {r['save_s']:.3f} | {r['xxh3_in_save_s']:.3f} | "
                    f"{100 * r['xxh3_in_save_s'] / r['save_s']:.1f}% | {r['xxh3_s']:.3f} | {r['blake2b_s']:.3f} | "
                    f"{100 * r['blake2b_s'] / r['save_s']:.1f}% | {cold} |")
    table = "\n".join(rows)
    print(table)
    if not args.no_write:
        write_section(args.results, "checkpoint_digest", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
