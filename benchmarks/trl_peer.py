"""The peer row of ``step_speed.py``: TRL's DPOTrainer on the same model, rows and batches, under DeepSpeed ZeRO-3.

Launched by ``step_speed.py`` through ``torch.distributed.run`` (one process per rank). Needs the ``bench``
extra (``pip install -e .[bench]``: trl 1.16). Writes one JSON: per step the slowest rank's time, the
CPU seconds and real (attention-mask) tokens of all ranks and the loss, and each rank's peak RSS.

TRL settings that differ from its defaults, to match aligner's rows: ``bf16`` only where the row is bf16,
no gradient checkpointing, file-order batches (``train_sampling_strategy="sequential"``; aligner runs with
``data.shuffle=false``), no logging or saving. ``--sync-ref`` turns on ``sync_ref_model`` (TR-DPO's
reference update, the nearest TRL has to tr_soft; TRL has no FlipGuard).

ZeRO-3 on CPU under accelerate (``../shared/bench/README.md``): accelerate sees one process unless its
state is created first with the gloo backend while ``ACCELERATE_USE_DEEPSPEED`` is set, and the trainer is
told to use that state (``accelerator_config={"use_configured_state": True}``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="JSON file written by rank 0")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--pairs", type=int, default=4, help="preference pairs per rank per step")
    p.add_argument("--max-length", type=int, default=640)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--sync-ref", action="store_true", help="TRL's sync_ref_model, every step")
    p.add_argument("--precompute-ref", action="store_true",
                   help="TRL's precompute_ref_log_probs (its fastest DPO setting; a pre-pass before step 1)")
    p.add_argument("--lora-r", type=int, default=0, help="LoRA DPO through peft_config (all-linear, alpha 2r); 0 = full")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)
    return p.parse_args()


def deepspeed_config(bf16: bool) -> dict:
    return {
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "bf16": {"enabled": bf16}, "fp16": {"enabled": False},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                  "weight_decay": "auto", "torch_adam": True}},
        "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True},
        "steps_per_print": 10**9, "wall_clock_breakdown": False,
    }


def lora_config(r: int):
    """TRL's LoRA DPO (``peft_config``): the reference is the policy with its adapters disabled, as in aligner."""
    if not r:
        return None
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def main() -> None:
    args = parse_args()
    import torch
    import torch.distributed as dist
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    on_cpu = not torch.cuda.is_available()
    accelerator_config = None
    if on_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
        accelerator_config = {"use_configured_state": True}

    steps: list[dict] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            steps.append({"begin": time.perf_counter(), "cpu_begin": time.process_time(), "tokens": 0})

        def on_step_end(self, *_, **__):
            steps[-1]["end"] = time.perf_counter()
            steps[-1]["cpu_s"] = time.process_time() - steps[-1]["cpu_begin"]

    class CountingDPOTrainer(DPOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            steps[-1]["tokens"] += int(inputs["attention_mask"].sum())
            loss = super().training_step(model, inputs, num_items_in_batch)
            steps[-1]["loss"] = float(loss)
            return loss

    bf16 = args.dtype == "bfloat16"
    config = DPOConfig(
        output_dir=os.path.join(os.path.dirname(os.path.abspath(args.out)), "trl-trainer"),
        per_device_train_batch_size=args.pairs, gradient_accumulation_steps=1, max_steps=args.steps,
        learning_rate=args.lr, beta=0.1, max_length=args.max_length, bf16=bf16, fp16=False,
        gradient_checkpointing=False, logging_strategy="no", save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, train_sampling_strategy="sequential", dataloader_num_workers=0,
        seed=42, deepspeed=deepspeed_config(bf16), model_init_kwargs={"dtype": args.dtype},
        accelerator_config=accelerator_config,
        sync_ref_model=args.sync_ref, ref_model_sync_steps=1, precompute_ref_log_probs=args.precompute_ref,
    )
    started = time.perf_counter()
    trainer = CountingDPOTrainer(
        model=args.model,  # under ZeRO-3 TRL builds the reference from this path too
        args=config,
        train_dataset=load_dataset("json", data_files=args.data, split="train"),
        processing_class=AutoTokenizer.from_pretrained(args.model),
        callbacks=[Timer()],
        peft_config=lora_config(args.lora_r),
    )
    init_s = time.perf_counter() - started
    trainer.train()
    peak = (torch.cuda.max_memory_allocated() if not on_cpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    mine = {"durations": [s["end"] - s["begin"] for s in steps], "cpu_s": [s["cpu_s"] for s in steps],
            "tokens": [s["tokens"] for s in steps],
            "losses": [s.get("loss") for s in steps], "peak_mem_gib": peak / 2**30}
    ranks = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    if int(os.environ.get("RANK", "0")) == 0:
        n = min(len(r["durations"]) for r in ranks)
        result = {
            "step_time_s": [max(r["durations"][i] for r in ranks) for i in range(n)],
            "tokens": [sum(r["tokens"][i] for r in ranks) for i in range(n)],
            "cpu_s": [sum(r["cpu_s"][i] for r in ranks) for i in range(n)],
            "losses": ranks[0]["losses"][:n],
            "peak_mem_gib_per_rank": [r["peak_mem_gib"] for r in ranks],
            "init_s": init_s,
            "world_size": len(ranks),
        }
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
