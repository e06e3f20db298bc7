"""Step-by-step parity with TRL 1.16's DPOTrainer: the same model, rows, order and optimizer, 10 steps each side.

    pip install -e .[bench]          # trl 1.16
    python benchmarks/trl_parity.py  # every loss both implement, and the MPO mix

For each loss (aligner plugin ↔ TRL ``loss_type``) and for a weighted mix, it
runs aligner (``launch/train.py``, one rank, ZeRO-3) and TRL (in this process,
one process, no DeepSpeed) on the embedded tiny-sort model and the first
steps × pairs embedded training rows in file order (aligner ``data.shuffle=false``,
TRL ``train_sampling_strategy="sequential"``), fp32, AdamW (β = (0.9, 0.999),
ε = 1e-8, no weight decay), a constant learning rate without warm-up and
gradient clipping at 1. It reports the largest per-step difference of
``train/loss`` (TRL: the loss its ``training_step`` returns, not the logged
value, which the HF Trainer rounds to 4 decimals) and of ``rewards/*`` (TRL: its
per-step logged metrics), and writes the table to RESULTS.md.

Deliberate convention differences are named in the table's last column: aligner's
``dpo.label_smoothing`` is cDPO while TRL 1.16's ``sigmoid`` has none (both run
with ε = 0 here), and TRL takes one ``beta`` and one ``label_smoothing`` for all
its loss types where aligner has one per loss (set equal here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_md import command_line, free_port, write_section  # noqa: E402

#: name -> (aligner --plugins and --set overrides, TRL loss types, TRL loss weights, TRL label_smoothing, note)
CASES: dict[str, tuple[list[str], list[str], list[str], list[float] | None, float, str]] = {
    "dpo / sigmoid": (["dpo"], [], ["sigmoid"], None, 0.0, ""),
    "hinge": (["hinge"], [], ["hinge"], None, 0.0, ""),
    "ipo": (["ipo"], [], ["ipo"], None, 0.0, "both average log-ratios per token"),
    "exo_pair": (["exo_pair"], ["exo_pair.epsilon=0.001"], ["exo_pair"], None, 1e-3, "TRL's ε is its label_smoothing"),
    "nca_pair": (["nca_pair"], [], ["nca_pair"], None, 0.0, ""),
    "robust": (["robust"], ["robust.label_smoothing=0.1"], ["robust"], None, 0.1, "ε = 0.1"),
    "bco_pair": (["bco_pair"], [], ["bco_pair"], None, 0.0, "no reward shift δ on either side"),
    "sppo_hard": (["sppo_hard"], [], ["sppo_hard"], None, 0.0, ""),
    "aot": (["aot"], [], ["aot"], None, 0.0, "sorted per micro-batch on both sides"),
    "aot_unpaired": (["aot_unpaired"], [], ["aot_unpaired"], None, 0.0, ""),
    "apo_zero": (["apo_zero"], [], ["apo_zero"], None, 0.0, ""),
    "apo_down": (["apo_down"], [], ["apo_down"], None, 0.0, ""),
    "discopop": (["discopop"], [], ["discopop"], None, 0.0, "τ = 0.05 both"),
    "sft": (["sft"], [], ["sft"], None, 0.0, "rewards/* with β = 0.1 on both (aligner: no loss has a β)"),
    "sigmoid_norm": (["sigmoid_norm"], [], ["sigmoid_norm"], None, 0.0, ""),
    "MPO mix: 0.8·dpo + 0.2·bco_pair + 1·sft": (["dpo", "bco_pair", "sft"], ["dpo.weight=0.8", "bco_pair.weight=0.2"],
                                               ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], 0.0, "weighted sum"),
}
REWARD_TAGS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/trl_parity.py", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--pairs", type=int, default=4, help="preference pairs per step")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all); e.g. ipo,sft")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    return p.parse_args(argv)


def run_aligner(case: tuple, model: str, data: Path, out: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    """aligner, one rank, through launch/train.py; per-step train/loss and rewards/* from its TensorBoard."""
    from aligner.evaluation.report import read_scalars

    plugins, overrides = case[0], case[1]
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs/tiny-cpu.yaml"),
           "--plugins", ",".join(plugins), "--set", f"output_dir={out}", f"model.name_or_path={model}",
           f"data.train={data}", "data.eval=null", "data.shuffle=false", f"train.max_steps={args.steps}",
           f"train.micro_batch_size={args.pairs}", f"train.lr={args.lr}", "train.lr_schedule=constant",
           "train.warmup_steps=0", "train.save_every=0", "train.max_grad_norm=1.0", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"aligner run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    scalars = read_scalars(out / "tensorboard")
    return {tag: [v for _, v in scalars[tag]] for tag in ("train/loss", *REWARD_TAGS) if tag in scalars}


def run_trl(case: tuple, model: str, data: Path, out: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    """TRL's DPOTrainer, one process: the loss its training_step returns, and its logged rewards/*, per step."""
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    series: dict[str, list[float]] = {"train/loss": []}

    class Recorder(TrainerCallback):
        def on_log(self, _args, _state, _control, logs=None, **__):
            for tag in REWARD_TAGS:
                if logs and tag in logs:
                    series.setdefault(tag, []).append(float(logs[tag]))

    class ExactLossDPOTrainer(DPOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            series["train/loss"].append(float(loss))
            return loss

    _, _, loss_types, weights, smoothing, _ = case
    config = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=args.pairs, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        optim="adamw_torch", beta=0.1, loss_type=loss_types, loss_weights=weights, label_smoothing=smoothing,
        max_length=64, logging_strategy="steps", logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, train_sampling_strategy="sequential", dataloader_num_workers=0,
        seed=42, bf16=False, fp16=False, use_cpu=True, model_init_kwargs={"dtype": "float32"},
    )
    trainer = ExactLossDPOTrainer(model=model, args=config, processing_class=AutoTokenizer.from_pretrained(model),
                                  train_dataset=load_dataset("json", data_files=str(data), split="train"),
                                  callbacks=[Recorder()])
    trainer.train()
    return series


def largest_difference(a: list[float], b: list[float]) -> float:
    n = min(len(a), len(b))
    return max(abs(x - y) for x, y in zip(a[:n], b[:n])) if n else float("nan")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from aligner.data.synthetic import make_rows
    from aligner.models import loading

    names = list(CASES) if not args.cases else [n for n in CASES if n.split(" ")[0] in args.cases.split(",")]
    model = str(loading.resolve_path("embedded:tiny-sort", "model"))
    work = Path(tempfile.mkdtemp(prefix="trl-parity-"))
    data = work / "rows.jsonl"
    rows = make_rows("train")[: args.steps * args.pairs]
    data.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for r in rows))
    lines = [f"Command: `{command_line(__file__, argv)}`", "",
             f"TRL 1.16 DPOTrainer vs aligner, {args.steps} steps × {args.pairs} pairs, embedded tiny-sort, fp32, "
             f"AdamW lr {args.lr} constant, clip 1, CPU, one process each. Largest |aligner − TRL| over the steps:", "",
             "| loss | steps | train/loss step 1 (aligner / TRL) | max Δ train/loss | max Δ rewards/chosen | "
             "max Δ rewards/margins | max Δ rewards/accuracies | convention notes |", "|---|---|---|---|---|---|---|---|"]
    for i, name in enumerate(names):
        ours = run_aligner(CASES[name], model, data, work / f"aligner-{i}", args)
        theirs = run_trl(CASES[name], model, data, work / f"trl-{i}", args)
        diffs = [largest_difference(ours.get(t, []), theirs.get(t, [])) for t in
                 ("train/loss", "rewards/chosen", "rewards/margins", "rewards/accuracies")]
        first = f"{ours['train/loss'][0]:.6f} / {theirs['train/loss'][0]:.6f}"
        row = (f"| {name} | {min(len(ours['train/loss']), len(theirs['train/loss']))} | {first} | "
               + " | ".join(f"{d:.2e}" for d in diffs) + f" | {CASES[name][5]} |")
        print(row, file=sys.stderr, flush=True)
        lines.append(row)
        write_section(Path(args.results), "trl_parity", "## TRL parity, loss by loss (benchmarks/trl_parity.py)\n\n"
                      + "\n".join(lines))  # after every row, so an interrupted run keeps the rows it has
    return 0


if __name__ == "__main__":
    sys.exit(main())
