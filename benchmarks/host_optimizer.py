#!/usr/bin/env python
"""The host optimizer step of an offloaded run (``train.offload_optimizer``): torch.optim.AdamW against
DeepSpeedCPUAdam, side by side in one run, on the same fp32 parameters and gradients.

    python benchmarks/host_optimizer.py                          # 50M, 200M and 1B parameters, 3 timed steps each
    python benchmarks/host_optimizer.py --sizes 5e6 --steps 1 --no-write   # quick look

Under ZeRO-3 offload DeepSpeed steps each rank's fp32 partition on the host, one sub-group after another; each
size here is that partition, held as tensors of at most ``--tensor-elems`` (125M) elements, as DeepSpeed's
sub-groups (``sub_group_size``) and a model's parameter tensors split it (one 1B tensor would also give
torch.optim.AdamW two 4 GB temporaries). Both optimizers run with torch's thread count (``--threads``, default
all cores). DeepSpeedCPUAdam's op is built (and cached in ``TORCH_EXTENSIONS_DIR``) before the timing.
The table goes to stdout and, unless ``--no-write``, into benchmarks/RESULTS.md (``host_optimizer`` section).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_md import command_line, write_section  # noqa: E402

HYPER = {"lr": 1e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}


def make_params(n: int, tensor_elems: int, seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for start in range(0, n, tensor_elems):
        p = torch.nn.Parameter(torch.randn(min(tensor_elems, n - start), generator=g))
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
        params.append(p)
    return params


def time_steps(optimizer_class, n: int, tensor_elems: int, steps: int) -> float:
    """Seconds per step (mean of ``steps`` after one warm-up step that allocates the moments)."""
    params = make_params(n, tensor_elems, seed=0)
    opt = optimizer_class(params, **HYPER)
    opt.step()
    started = time.perf_counter()
    for _ in range(steps):
        opt.step()
    elapsed = (time.perf_counter() - started) / steps
    del opt, params
    gc.collect()
    return elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="5e7,2e8,1e9", help="parameters per rank, comma-separated")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--tensor-elems", type=float, default=1.25e8)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from aligner.models.loading import host_adam_problem

    problem = host_adam_problem()
    if problem:
        print(f"host_optimizer: {problem}", file=sys.stderr)
        return 1

    def torch_adamw(params, **kw):
        return torch.optim.AdamW(params, foreach=False, **kw)  # what DeepSpeed's torch_adam builds on host tensors

    def ds_cpu_adam(params, **kw):
        return DeepSpeedCPUAdam(params, adamw_mode=True, **kw)

    rows = []
    for size in (int(float(s)) for s in args.sizes.split(",")):
        t_torch = time_steps(torch_adamw, size, int(args.tensor_elems), args.steps)
        t_ds = time_steps(ds_cpu_adam, size, int(args.tensor_elems), args.steps)
        rows.append((size, t_torch, t_ds))
        print(f"{size / 1e6:.0f}M: torch AdamW {t_torch:.3f} s, DeepSpeedCPUAdam {t_ds:.3f} s", flush=True)
    load = os.getloadavg()[0]
    lines = [f"Host optimizer step, {args.threads} threads, load average {load:.1f} at the end "
             f"({args.steps} timed steps after one warm-up):", "",
             "| parameters | torch.optim.AdamW s/step | DeepSpeedCPUAdam s/step | speed-up |", "|---|---|---|---|"]
    lines += [f"| {n / 1e6:.0f}M | {a:.3f} | {b:.3f} | {a / b:.1f}x |" for n, a, b in rows]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section(HERE / "RESULTS.md", "host_optimizer",
                      f"### Offloaded optimizer step on the host\n\n{table}\n\nCommand: `{command_line(__file__, argv)}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
