#!/usr/bin/env python
"""What only a GPU can show, in one command of at most 10 minutes on one H200: the first run of aligner's GPU path.

    python benchmarks/gpu_check.py                      # every phase; JSON + Markdown under --out
    python benchmarks/gpu_check.py --write              # ... and the table into benchmarks/RESULTS.md

The phases run one after another, each in a subprocess with its own timeout, and none is retried: a failure is
a row with its error, and the next phase runs. A phase that the time left (``--budget-s``, default 570 s) cannot
hold is skipped with that reason. The rows:

1. ``environment``: torch, CUDA, the GPU and its compute capability, flash-attn's import (or its error), the
   ``varlen_attn`` signature, the kernel each dtype gets (:func:`aligner.models.attention.choose_kernel`) and what its
   self-check costs.
2. ``kernel parity``: Llama-3-8B attention shapes (hidden 4096, 32 query / 8 key-value heads, head dim 128;
   2 layers, a small MLP and vocabulary), bf16, padded / packed / prefix-shared batches, each available kernel,
   against the same weights in fp32 on padded SDPA: the largest per-token log-prob difference and the relative
   gradient error (:func:`kernel_parity`).
3. ``five-step runs`` on one GPU, each checking step 1's ``dpo/loss`` (ln 2: policy = reference; KTO's
   ``kto/loss`` 0.5) and the ``batch path:`` line: ``dpo``; ``dpo,tr_soft,flipguard`` full fine-tuning with the
   reference moved every step; LoRA ``dpo,tr_soft``; ``kto``.
4. ``step speed``: benchmarks/step_speed.py's default, unshared and naive rows (tok/s, MFU, peak memory).
5. ``8B LoRA``: benchmarks/lora_8b.sh, 3 steps of ``dpo,tr_soft,flipguard`` at 32 layers (no size search).
6. ``2 GPUs``: with two or more GPUs, a 2-rank ``dpo`` run and the same with ``train.sequence_parallel=2`` (it
   runs fourth, before the slow rows).

On a machine without a GPU every phase after the first is skipped ("no GPU"), so the script itself is checked
on CPU (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from results_md import command_line, write_section  # noqa: E402

#: (name, timeout in seconds): the whole is at most ~9.5 minutes on one GPU
PHASES = [("environment", 45), ("kernel parity", 75), ("five-step runs", 180), ("2 GPUs", 90), ("step speed", 120),
          ("8B LoRA", 180)]
#: |step-1 loss - its exact value| allowed: bf16 packs the pre-pass and the steps differently (other GEMM tilings)
STEP1_TOL = 1e-2
LN2 = math.log(2)
#: the 8B attention shapes of phase 2 (Llama-3-8B config.json), on 2 layers
PARITY_SHAPE = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                "intermediate_size": 1024, "num_hidden_layers": 2, "vocab_size": 2048}
#: pass marks of phase 2 (bf16 against fp32): mean log-prob per token, relative gradient error
PARITY_TOL = {"logp_per_token": 0.05, "grad_rel": 0.05}


# -- phase 2: kernel parity ----------------------------------------------------------------------------------------

def parity_examples(vocab: int, lengths: list[tuple[int, int, int]], seed: int = 0) -> list:
    """Preference pairs of (prompt, chosen, rejected) token counts, random ids."""
    import torch

    from aligner.data import Example

    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    return [Example(f"pair-{i}", ids(p), ids(c), ids(r)) for i, (p, c, r) in enumerate(lengths)]


def kernel_parity(config: dict, kernels: list, device, examples: list) -> list[dict]:
    """Per layout and kernel: log-probs and gradients of a bf16 model against the same weights in fp32 on padded
    SDPA. ``kernels``: :class:`aligner.models.attention.Kernel` objects (the detected ones; a test's stand-ins)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from aligner.data import collate_pairs, pack_pairs, pack_prefix_shared
    from aligner.models import attention
    from aligner.scoring.logps import batch_logps

    torch.manual_seed(0)
    reference = LlamaForCausalLM(LlamaConfig(**config, tie_word_embeddings=False, attn_implementation="sdpa"))
    reference = reference.to(device, torch.float32)
    model = LlamaForCausalLM(LlamaConfig(**config, tie_word_embeddings=False, attn_implementation=attention.register()))
    model.load_state_dict(reference.state_dict())
    model = model.to(device, torch.bfloat16)

    def run(m, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m.zero_grad()
        logps, counts = batch_logps(m, batch)
        (logps * torch.linspace(-1, 1, logps.shape[0], device=logps.device)).sum().backward()
        grads = torch.cat([p.grad.float().flatten() for p in m.parameters()])
        return logps.detach().float(), counts, grads

    want, counts, g_want = run(reference, collate_pairs(examples, 0))
    layouts = {"padded": lambda exs: collate_pairs(exs, 0), "packed": pack_pairs, "prefix-shared": pack_prefix_shared}
    rows = []
    previous = attention.active_kernel()
    try:
        for layout, collate in layouts.items():
            for kernel in ([attention.SDPA_SEGMENTS] if layout == "padded" else [*kernels, attention.SDPA_SEGMENTS]):
                attention.activate(attention.register_kernel(kernel).name)
                try:
                    got, _, g_got = run(model, collate(examples))
                except Exception as exc:  # noqa: BLE001 - a row with the kernel's error
                    rows.append({"layout": layout, "kernel": kernel.name, "error": f"{type(exc).__name__}: {exc}"[:300]})
                    continue
                per_token = ((got - want).abs() / counts.clamp(min=1)).max().item()
                grad_rel = ((g_got - g_want).norm() / g_want.norm()).item()
                rows.append({"layout": layout, "kernel": "sdpa (transformers)" if layout == "padded" else kernel.name,
                             "logp_per_token": per_token, "grad_rel": grad_rel,
                             "pass": per_token <= PARITY_TOL["logp_per_token"] and grad_rel <= PARITY_TOL["grad_rel"]})
    finally:
        attention.activate(previous.name)
    return rows


def phase_environment() -> dict:
    import inspect

    import torch

    from aligner.models import attention
    from aligner.scoring.batch_path import attention_shape

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count()}
    for name in ("transformers", "deepspeed", "peft", "datasets"):
        try:
            out[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001
            out[name] = f"missing: {exc}"
    if not torch.cuda.is_available():
        return out | {"status": "no GPU"}
    out["gpu"] = torch.cuda.get_device_name()
    out["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    out["bf16"] = torch.cuda.is_bf16_supported()
    found, missing = attention.detect_kernels()
    out["kernels found"], out["kernels missing"] = [k.name for k in found], missing
    try:
        from torch.nn.attention.varlen import varlen_attn

        out["varlen_attn signature"] = str(inspect.signature(varlen_attn))
    except ImportError as exc:
        out["varlen_attn signature"] = f"none: {exc}"
    from transformers import LlamaConfig

    heads = attention_shape(LlamaConfig(**PARITY_SHAPE))
    for dtype in (torch.bfloat16, torch.float32):
        started = time.perf_counter()
        kernel, reasons = attention.choose_kernel(dtype, *heads, None, candidates=found)
        torch.cuda.synchronize()
        out[f"kernel {str(dtype).removeprefix('torch.')}"] = {"chosen": kernel.name, "passed over": reasons,
                                                              "self-check s": round(time.perf_counter() - started, 3)}
    return out | {"status": "ok"}


def phase_kernel_parity() -> dict:
    import torch

    from aligner.models import attention

    if not torch.cuda.is_available():
        return {"status": "no GPU"}
    found, missing = attention.detect_kernels()
    examples = parity_examples(PARITY_SHAPE["vocab_size"], [(300, 120, 200), (0, 250, 80), (900, 60, 400), (40, 40, 40)])
    rows = kernel_parity(PARITY_SHAPE, found, torch.device("cuda"), examples)
    bad = [r for r in rows if not r.get("pass")]
    return {"status": "ok" if not bad else "FAILED", "rows": rows, "missing": missing}


# -- phases 3, 5, 6: launched runs -----------------------------------------------------------------------------

#: (name, --plugins, --set items, the step-1 loss tag and value)
RUNS = [
    ("dpo", "dpo", [], ("dpo/loss", LN2)),
    ("dpo,tr_soft,flipguard (reference moved every step)", "dpo,tr_soft,flipguard", ["tr_soft.every=1"],
     ("dpo/loss", LN2)),
    ("LoRA dpo,tr_soft", "dpo,tr_soft", ["model.lora.r=8", "tr_soft.every=1"], ("dpo/loss", LN2)),
    ("kto", "kto", [], ("kto/loss", 0.5)),
]


def launched_run(name: str, plugins: str, sets: list[str], check: tuple[str, float], nproc: int, work: Path,
                 timeout: float) -> dict:
    """One 5-step run of the embedded tiny config through the DeepSpeed launcher; its step-1 loss and batch path."""
    from aligner.evaluation.report import read_scalars
    from aligner.training.launcher import deepspeed_command

    out = work / name.split(" ")[0].replace(",", "+")
    args = ["--config", "configs/tiny-cpu.yaml", "--plugins", plugins, "--set", "train.max_steps=5",
            "train.log_every=1", "train.save_every=0", "eval.every=0", f"output_dir={out}", *sets]
    started = time.perf_counter()
    proc = subprocess.run(deepspeed_command(args, nproc), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    row = {"run": name, "ranks": nproc, "exit": proc.returncode, "seconds": round(time.perf_counter() - started, 1)}
    path_line = next((line.split("batch path: ", 1)[1] for line in proc.stderr.splitlines() if "batch path: " in line), None)
    row["batch path"] = path_line
    if proc.returncode != 0 or path_line is None:
        return row | {"pass": False, "error": proc.stderr[-1500:]}
    tag, want = check
    scalars = read_scalars(out / "tensorboard")
    first = dict(scalars.get(tag, [])).get(1)
    row |= {tag: first, "steps": len(scalars.get("train/loss", [])),
            "tok/s": dict(scalars.get("perf/tokens_per_s", [])).get(5)}
    return row | {"pass": first is not None and abs(first - want) < STEP1_TOL and row["steps"] == 5}


def phase_five_step_runs(deadline: float) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"status": "no GPU"}
    work = Path(tempfile.mkdtemp(prefix="aligner-gpu-check-"))
    rows = []
    for name, plugins, sets, check in RUNS:
        left = deadline - time.monotonic()
        if left < 20:
            rows.append({"run": name, "pass": False, "error": "no time left"})
            continue
        try:
            rows.append(launched_run(name, plugins, sets, check, 1, work, left))
        except subprocess.TimeoutExpired:
            rows.append({"run": name, "pass": False, "error": f"timed out after {left:.0f} s"})
    return {"status": "ok" if all(r.get("pass") for r in rows) else "FAILED", "rows": rows}


def phase_two_gpus(deadline: float) -> dict:
    import torch

    if torch.cuda.device_count() < 2:
        return {"status": f"skipped: {torch.cuda.device_count()} GPU(s)"}
    work = Path(tempfile.mkdtemp(prefix="aligner-gpu-check-2-"))
    rows = [launched_run("dpo", "dpo", [], ("dpo/loss", LN2), 2, work, deadline - time.monotonic())]
    # Ulysses sequence parallelism over both GPUs (one data-parallel group): the same global batch as the 1-GPU run
    rows.append(launched_run("dpo-sp2", "dpo", ["train.sequence_parallel=2"], ("dpo/loss", LN2), 2, work,
                             deadline - time.monotonic()))
    return {"status": "ok" if all(r.get("pass") for r in rows) else "FAILED", "rows": rows}


def phase_step_speed(deadline: float) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"status": "no GPU"}
    out = Path(tempfile.mkdtemp(prefix="aligner-gpu-speed-")) / "rows.json"
    left = deadline - time.monotonic()
    cmd = [sys.executable, str(HERE / "step_speed.py"), "--device", "cuda", "--rows", "default,unshared,naive",
           "--steps", "6", "--warmup", "2", "--no-write", "--json", str(out), "--timeout", str(int(left / 3))]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=left)
    if proc.returncode != 0 or not out.is_file():
        return {"status": "FAILED", "error": proc.stderr[-1500:]}
    return {"status": "ok", "rows": json.loads(out.read_text()), "table": proc.stdout[-3000:]}


def phase_lora_8b(deadline: float) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"status": "no GPU"}
    work = tempfile.mkdtemp(prefix="aligner-lora-8b-")
    env = {**os.environ, "STEPS": "3", "WORK": work, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(HERE / "lora_8b.sh")], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=deadline - time.monotonic())
    table = Path(work, "lora_8b.md")
    if proc.returncode != 0 or not table.is_file():
        return {"status": "FAILED", "error": (proc.stdout + proc.stderr)[-1500:]}
    return {"status": "ok", "table": table.read_text()}


PHASE_FUNCTIONS = {"environment": lambda deadline: phase_environment(),
                   "kernel parity": lambda deadline: phase_kernel_parity(),
                   "five-step runs": phase_five_step_runs, "step speed": phase_step_speed,
                   "8B LoRA": phase_lora_8b, "2 GPUs": phase_two_gpus}


# -- the driver ------------------------------------------------------------------------------------------------

def run_phase(name: str, timeout: float, out_dir: Path) -> dict:
    """``name`` in a subprocess of its own (a hang or a crash ends that phase only), at most ``timeout`` s."""
    result_file = out_dir / f"phase-{name.replace(' ', '_')}.json"
    cmd = [sys.executable, __file__, "--phase", name, "--phase-timeout", str(timeout), "--phase-out", str(result_file)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout + 15)
    except subprocess.TimeoutExpired:
        return {"status": f"FAILED: timed out after {timeout:.0f} s"}
    result = json.loads(result_file.read_text()) if result_file.is_file() else {
        "status": f"FAILED: exit {proc.returncode}", "error": proc.stderr[-1500:]}
    return result | {"seconds": round(time.perf_counter() - started, 1)}


def markdown(results: dict[str, dict]) -> str:
    lines = ["| phase | status | seconds | what it shows |", "|---|---|---|---|"]
    for name, res in results.items():
        lines.append(f"| {name} | {res.get('status')} | {res.get('seconds', '')} | {_summary(name, res)} |")
    return "\n".join(lines)


def _summary(name: str, res: dict) -> str:
    if name == "environment":
        keys = ("gpu", "capability", "torch", "cuda", "kernel bfloat16", "kernels missing", "varlen_attn signature")
        return "; ".join(f"{k}: {res[k]}" for k in keys if k in res).replace("|", "/")
    if "rows" in res:
        return "<br>".join(", ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != "error")
                           + (f" ERROR {row['error'][:160]}" if "error" in row else "")
                           for row in res["rows"]).replace("|", "/")
    return str(res.get("error", res.get("table", "")))[-400:].replace("|", "/").replace("\n", " ")


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", os.path.join(tempfile.gettempdir(), "aligner-gpu-check")),
                   help="folder for gpu_check.json and gpu_check.md (default: $OUT, else a temporary folder)")
    p.add_argument("--budget-s", type=float, default=570.0, help="seconds for all phases together")
    p.add_argument("--write", action="store_true", help="put the table into benchmarks/RESULTS.md (gpu_check section)")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--phase-timeout", type=float, help=argparse.SUPPRESS)
    p.add_argument("--phase-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase:  # one phase, in this subprocess
        deadline = time.monotonic() + args.phase_timeout
        try:
            result = PHASE_FUNCTIONS[args.phase](deadline)
        except Exception as exc:  # noqa: BLE001 - a failed phase is a row
            result = {"status": f"FAILED: {type(exc).__name__}: {exc}"[:300], "error": traceback.format_exc()[-1500:]}
        Path(args.phase_out).write_text(json.dumps(result, indent=2, default=str))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    end = time.monotonic() + args.budget_s
    results: dict[str, dict] = {}
    for name, timeout in PHASES:
        left = end - time.monotonic()
        if results and results["environment"].get("status") == "no GPU":
            results[name] = {"status": "skipped: no GPU"}
        elif left < min(timeout, 30):
            results[name] = {"status": f"skipped: {left:.0f} s left of --budget-s"}
        else:
            results[name] = run_phase(name, min(timeout, left), out)
        print(f"{name}: {results[name].get('status')}", flush=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    table = markdown(results)
    (out / "gpu_check.md").write_text(table + "\n")
    print(table)
    if args.write:
        gpu = results["environment"].get("gpu", "no GPU")
        write_section(HERE / "RESULTS.md", "gpu_check", f"### GPU check ({time.strftime('%Y-%m-%d')}, {gpu})\n\n"
                      f"{table}\n\nCommand: `{command_line(__file__, argv)}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
