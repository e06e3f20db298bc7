"""Helpers of ``benchmarks/scale_8b.sh``: an 8B-shaped random checkpoint, long preference pairs, the estimate.

    python benchmarks/scale_8b.py plugins                      # tr_soft,flipguard if installed, else dpo
    python benchmarks/scale_8b.py write-model DIR --layers 32  # Llama-3-8B shapes, random init, bf16
    python benchmarks/scale_8b.py write-data FILE --pairs 64 --tokens 2048
    python benchmarks/scale_8b.py fit --config C --plugins P --gpu-mem-gib 78 --host-mem-gib 100
    python benchmarks/scale_8b.py estimate --config C --plugins P --layers N --gpus G
    python benchmarks/scale_8b.py summarize OUT_DIR --config C --plugins P --layers N
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WANTED = ["tr_soft", "flipguard"]


def chosen_plugins() -> str:
    from aligner.registry import available_plugins

    found = available_plugins()
    missing = [name for name in WANTED if name not in found]
    if missing:
        print(f"scale_8b: plugins {', '.join(missing)} are not installed; falling back to --plugins dpo", file=sys.stderr)
        return "dpo"
    return ",".join(WANTED)


def shape_dict(layers: int) -> dict:
    from aligner.tools.estimate import BUILTIN_SHAPES

    return {**BUILTIN_SHAPES["llama3-8b"], "num_hidden_layers": layers}


def write_model(path: Path, layers: int) -> None:
    """Llama-3-8B shapes with ``layers`` layers, weights N(0, 0.02) (HF's initializer_range), bf16, saved with
    save_pretrained beside the byte-level embedded tokenizer (its ids are valid in a 128256-token vocabulary)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from aligner.data import embedded

    conf = {k: v for k, v in shape_dict(layers).items() if k != "model_type"}
    config = LlamaConfig(**conf, pad_token_id=0, bos_token_id=1, eos_token_id=2, dtype="bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    model.to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.save_pretrained(path)
    embedded.build_tokenizer().save_pretrained(path)


def write_data(path: Path, pairs: int, tokens: int) -> None:
    """Pairs whose prompt and responses are each about ``tokens // 2`` byte-level tokens, so every sequence
    is cut at ``data.max_length``: the memory of the configured length, not of short rows."""
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()

    def text(n_chars: int) -> str:
        out = []
        while sum(len(w) + 1 for w in out) < n_chars:
            out.append(rng.choice(words))
        return " ".join(out)

    with path.open("w") as f:
        for i in range(pairs):
            f.write(json.dumps({"id": f"long-{i}", "prompt": text(tokens // 2), "chosen": " " + text(tokens // 2),
                                "rejected": " " + text(tokens // 2)}) + "\n")


def estimate_for(config: str, plugins: str, layers: int, gpus: int, overrides: list[str]):
    from aligner.recipes.train import configure
    from aligner.tools import estimate

    cfg, active = configure(argparse.Namespace(config=config, plugins=plugins, overrides=[overrides] if overrides else []))
    shape = estimate.ModelShape.from_dict(shape_dict(layers), f"llama3-8b with {layers} layers")
    return estimate.estimate(cfg, active, shape, gpus_per_node=gpus)


def fit_layers(config: str, plugins: str, gpu_mem_gib: float, host_mem_gib: float, overrides: list[str]) -> int:
    """The largest layer count (32 down to 1) whose estimate fits one GPU and the host memory given."""
    from aligner.tools.estimate import GIB

    for layers in range(32, 0, -1):
        est = estimate_for(config, plugins, layers, 1, overrides)
        if est.peak <= gpu_mem_gib * GIB and est.host_per_node + est.overhead <= host_mem_gib * GIB:
            return layers
    return 0


def summarize(out: Path, config: str, plugins: str, layers: int, overrides: list[str]) -> str:
    from aligner.tools.estimate import GIB

    record = json.loads((out / "rss_rank0.json").read_text())
    one = estimate_for(config, plugins, layers, 1, overrides)
    full8 = estimate_for(config, plugins, 32, 8, overrides)
    rows = [
        f"| layers | plugins | step s | peak GPU GiB (allocated / reserved) | predicted GPU GiB | peak host RSS GiB | predicted host GiB |",
        "|---|---|---|---|---|---|---|",
        f"| {layers} | `{plugins}` | {record['step_s']:.2f} | {record.get('gpu_steps_gib', float('nan')):.1f} / "
        f"{record.get('gpu_reserved_gib', float('nan')):.1f} | {one.peak / GIB:.1f} | {record['steps_gib']:.1f} "
        f"| {(one.host_per_node) / GIB:.1f} + process |",
    ]
    note = (f"\nEstimate for all 32 layers on 8 GPUs (same config): {full8.peak / GIB:.1f} GiB per GPU"
            f"{', host ' + format(full8.host_per_node / GIB, '.0f') + ' GiB per node' if full8.host else ''}.")
    return "\n".join(rows) + note


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="helpers of benchmarks/scale_8b.sh")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("plugins")
    m = sub.add_parser("write-model")
    m.add_argument("path", type=Path)
    m.add_argument("--layers", type=int, default=32)
    d = sub.add_parser("write-data")
    d.add_argument("path", type=Path)
    d.add_argument("--pairs", type=int, default=64)
    d.add_argument("--tokens", type=int, default=2048)
    for name in ("fit", "estimate", "summarize"):
        s = sub.add_parser(name)
        if name == "summarize":
            s.add_argument("out", type=Path)
        s.add_argument("--config", required=True)
        s.add_argument("--plugins", required=True)
        s.add_argument("--layers", type=int, default=32)
        s.add_argument("--gpus", type=int, default=1)
        s.add_argument("--gpu-mem-gib", type=float, default=78.0)
        s.add_argument("--host-mem-gib", type=float, default=100.0)
        s.add_argument("--set", dest="overrides", nargs="*", default=[])
    args = p.parse_args(argv)
    if args.cmd == "plugins":
        print(chosen_plugins())
    elif args.cmd == "write-model":
        write_model(args.path, args.layers)
    elif args.cmd == "write-data":
        write_data(args.path, args.pairs, args.tokens)
    elif args.cmd == "fit":
        print(fit_layers(args.config, args.plugins, args.gpu_mem_gib, args.host_mem_gib, args.overrides))
    elif args.cmd == "estimate":
        from aligner.tools.estimate import format_estimate

        print(format_estimate(estimate_for(args.config, args.plugins, args.layers, args.gpus, args.overrides), args.gpu_mem_gib))
    else:
        print(summarize(args.out, args.config, args.plugins, args.layers, args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
