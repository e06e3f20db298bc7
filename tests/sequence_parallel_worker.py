"""The sequence-parallel exactness scenarios, run one after another in one process: on one rank (``python``), or
on N ranks under the DeepSpeed launcher with ``train.sequence_parallel: N`` (tests/test_sequence_parallel_e2e.py).

Each scenario is a real training run through :class:`aligner.recipes.train.Recipe` (its setup, loop, saves, evals and
export). The only addition: right before the policy engine's first optimizer step, every parameter's full
gradient is read with DeepSpeed's ``safe_get_full_grad`` (a collective) and rank 0 saves them. The real
``step`` then runs.

    python tests/sequence_parallel_worker.py OUT MODEL TRAIN EVAL SP [--kv3-model DIR] [SCENARIO ...]

With SP > 1 it also resumes the first scenario from its step-5 checkpoint into ``OUT/<scenario>-resumed``, and
runs the setup of each bad config of :data:`REFUSED` (on every rank, as a real run would), recording the error
each one stops with, and whether any engine had been built, in ``OUT/refusals.json``.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch

from aligner.recipes import train
from aligner.training import teardown

COMMON = ["data.shuffle=false", "data.max_length=256", "train.max_steps=10", "train.micro_batch_size=2",
          "train.lr=5e-4", "train.lr_schedule=constant", "train.warmup_steps=0", "train.save_every=0",
          "eval.every=0", "eval.batch_size=2", "train.balance_ranks=false"]
#: scenario -> (plugins, overrides): together they cover prefix sharing and plain packing, the chunked head and
#: full logits, the static cache (pre-pass and eval), a moved reference (tr_soft, tr_hard), LoRA, gradient
#: checkpointing (its recomputed forward repeats the all-to-alls inside backward), and losses that read token
#: counts (ipo, sft).
SCENARIOS = {
    # evaluated and saved at step 5 too (the resumed run starts there)
    "dpo-prefix": ("dpo,sft", ["train.prefix_sharing=true", "train.logps_chunk_tokens=16", "train.save_every=5",
                               "eval.every=5"]),
    "tr-soft": ("ipo,tr_soft", ["train.prefix_sharing=false", "train.logps_chunk_tokens=0", "tr_soft.every=3",
                                "tr_soft.alpha=0.5", "model.gradient_checkpointing=true"]),
    "lora": ("dpo,tr_hard", ["model.lora.r=4", "train.prefix_sharing=true", "tr_hard.every=4", "train.lr=5e-3"]),
    # the pairs as unpaired completions, with mismatched KL rows: padded on one rank, packed and sharded under SP
    "kto": ("kto", ["train.cache_static_logps=false"]),
}


#: bad config -> (plugins, overrides): each must be refused before any engine is built ("KV3" is a model with
#: 6 query and 3 key/value heads, which 2 ranks can neither split nor replicate). One refusal from the config
#: alone (the world size; the others of aligner.scoring.sequence_parallel.check_config are decided in the same place and
#: tested in-process), and one that needs the model.
REFUSED = {
    "world": ("dpo", ["train.sequence_parallel=3"]),
    "kv_heads": ("dpo", ["model.name_or_path=KV3"]),
}


def argv(out: Path, model: str, train_file: str, eval_file: str, sp: int, name: str, resume: Path | None = None) -> list[str]:
    plugins, extra = SCENARIOS[name]
    folder = out / (f"{name}-resumed" if resume else name)
    sets = [f"output_dir={folder}", f"model.name_or_path={model}", f"data.train={train_file}", f"data.eval={eval_file}",
            f"train.sequence_parallel={sp}", *COMMON, *extra]
    return ["--plugins", plugins, "--overwrite", "--set", *sets, *(["--resume", str(resume)] if resume else [])]


def run(args_list: list[str], grads_file: Path | None) -> None:
    """One real run; with ``grads_file``, the gradients before the first optimizer step are saved there."""
    import deepspeed.utils

    args = train.parse_args(args_list)
    cfg, plugins = train.configure(args)
    recipe = train.Recipe(cfg, plugins, args).setup()
    engine, real_step, taken = recipe.policy, recipe.policy.step, []

    def step(*a, **k):
        if grads_file is not None and not taken:
            grads = {name: deepspeed.utils.safe_get_full_grad(p).detach().cpu().clone()
                     for name, p in engine.module.named_parameters() if p.requires_grad}
            if recipe.rank == 0:
                torch.save(grads, grads_file)
            taken.append(True)
        return real_step(*a, **k)

    engine.step = step  # the engine's own step runs right after
    recipe.finish(recipe.train())
    del recipe, engine
    gc.collect()


def refusals(out: Path, model: str, kv3_model: str, train_file: str, eval_file: str, sp: int) -> dict:
    """Each bad config's error (type and message) from a real setup, and whether it came before any engine."""
    from aligner.config import ConfigError

    found = {}
    for name, (plugins, extra) in REFUSED.items():
        sets = [f"output_dir={out / 'refused' / name}", f"model.name_or_path={model}", f"data.train={train_file}",
                f"data.eval={eval_file}", f"train.sequence_parallel={sp}", *COMMON,
                *[e.replace("KV3", kv3_model) for e in extra]]
        args = train.parse_args(["--plugins", plugins, "--overwrite", "--set", *sets])
        cfg, active = train.configure(args)
        recipe = train.Recipe(cfg, active, args)
        try:
            recipe.setup()
            found[name] = {"error": None}
        except ConfigError as exc:
            found[name] = {"error": str(exc), "engines_built": hasattr(recipe, "engines")}
    return found


def main() -> int:
    import argparse
    import json
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser()
    for name in ("out", "model", "train_file", "eval_file"):
        p.add_argument(name)
    p.add_argument("sp", type=int)
    p.add_argument("names", nargs="*")
    p.add_argument("--kv3-model")
    a, _ = p.parse_known_args()  # the launcher's --local_rank
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    names = a.names or list(SCENARIOS)
    for name in names:
        run(argv(out, a.model, a.train_file, a.eval_file, a.sp, name), out / f"{name}-grads.pt")
    if a.sp > 1:
        first = names[0]
        run(argv(out, a.model, a.train_file, a.eval_file, a.sp, first,
                 resume=out / first / "checkpoints" / "step_5"), None)
        if a.kv3_model:
            found = refusals(out, a.model, a.kv3_model, a.train_file, a.eval_file, a.sp)
            (out / "refusals.json").write_text(json.dumps(found, indent=2))
    teardown.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
