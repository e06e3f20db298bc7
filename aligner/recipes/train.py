"""The training recipe, top to bottom: config -> plugins -> data -> engines -> loop -> checkpoint -> export.

Run it through the DeepSpeed launcher (``deepspeed --num_gpus 2 launch/train.py ...``),
torchrun, or plain ``python`` for a single rank. ``aligner-train`` is the same.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from aligner.config import ConfigError, RunConfig, apply_overrides, build_config, read_yaml
from aligner.data import Batch, DataError, PairSampler, UnpairedExample, example_lengths, make_collate, prepare_data
from aligner.distributed import lockstep
from aligner.evaluation.eval import evaluate
from aligner.evaluation.report import plots as report_plots
from aligner.evaluation.reward_eval import RewardJudge
from aligner.hookspecs import DatasetSummary, Engines, RunStart, RunSummary
from aligner.models import ModelError, loading
from aligner.models.plan import POLICY_INITIAL, ModelPlan, make_plan, write_plan
from aligner.publishing import card
from aligner.publishing.push import EXIT_PUSH_FAILED, PushError, push_to_hub, warn_if_push_cannot_work
from aligner.registry import (ActivePlugins, PluginError, PluginHookError, activate, inactive_sections,
                              list_plugins_table, logger_names)
from aligner.scoring import batch_path, sequence_parallel, static_logps
from aligner.training import checkpoint, joblock, nonfinite, perf, preempt, teardown
from aligner.training.loggers import LoggerError, Loggers
from aligner.training.logging import StepMetrics, progress_bar, reduce_mean
from aligner.training.losses import check_weights, pair_only_losses
from aligner.training.step import gather_inputs, total_loss

log = logging.getLogger("aligner")
#: With ``train.on_nonfinite: skip``, a step that meets more non-finite micro-batches than this stops the run.
MAX_SKIPPED_PER_STEP = 8
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu.yaml"
#: Errors a user can fix (exit 2): raised on one rank, they are shared with the others (aligner/distributed/lockstep.py).
USER_ERRORS = (ConfigError, PluginError, DataError, ModelError, PluginHookError,
               static_logps.StaticCacheError, checkpoint.CheckpointError, LoggerError, joblock.LockError)


class RunError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="aligner-train", description="Preference alignment under DeepSpeed with plugins.")
    p.add_argument("--config", help=f"YAML run config (default: {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[1])}, the embedded tiny run)")
    p.add_argument("--plugins", help="comma-separated plugin names or module:attr targets, e.g. dpo,tr_soft,flipguard")
    p.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=5e-7 (repeatable)")
    p.add_argument("--resume", help="'auto' (latest checkpoint in output_dir) or a checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if output_dir holds another run's checkpoints")
    p.add_argument("--list-plugins", action="store_true", help="print the installed plugins and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # from the deepspeed launcher
    return p.parse_args(argv)


def configure(args: argparse.Namespace) -> tuple[RunConfig, ActivePlugins]:
    """Read the YAML, activate the plugins it (or --plugins) names, and build the typed config."""
    config_path = args.config
    if config_path is None:
        if not DEFAULT_CONFIG.is_file():
            raise ConfigError("no --config given and the default configs/tiny-cpu.yaml is not beside this install; pass --config")
        config_path = DEFAULT_CONFIG
    overrides = [item for group in args.overrides for item in group]
    raw = apply_overrides(read_yaml(config_path), overrides)
    if args.plugins is not None:
        raw["plugins"] = [n.strip() for n in args.plugins.split(",") if n.strip()]
        if not raw["plugins"]:
            raise ConfigError(f"--plugins {args.plugins!r} names no plugin; name a loss (e.g. --plugins dpo), or leave "
                              f"--plugins out to use the config's plugins list")
    names = raw.get("plugins") or []  # activate adds the default loss when none is named
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    plugins = activate(names, logger_names(raw.get("report_to"), f"{config_path}: report_to"))
    raw["plugins"], raw["report_to"] = plugins.training, plugins.loggers
    sections = plugins.config_sections()
    inactive = inactive_sections(plugins)
    overridden = {item.partition("=")[0].strip(): item for item in overrides}
    cfg = build_config(raw, sections, inactive, source=str(config_path), overridden=overridden)
    check_weights(plugins, cfg)
    return cfg, plugins


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def claim_output_dir(cfg: RunConfig, args: argparse.Namespace, rank: int, world: int) -> Path | None:
    """Collective: check ``output_dir``, take its job lock (released at teardown, aligner/training/joblock.py), and return the
    checkpoint to resume from, its files verified, if any. Rank 0 does the work; its errors are every rank's."""
    lockstep.on_rank_zero(lambda: open_output_dir(cfg, args), USER_ERRORS + (RunError,))
    lock = joblock.hold(cfg.output_dir, cfg.train.lock_wait_s if args.resume == "auto" else 0.0, world)
    if lock is not None:
        teardown.register(lock.release, after_ranks=True)
    resume_from = lockstep.on_rank_zero(lambda: prepare_output_dir(cfg, args, rank), USER_ERRORS + (RunError,))
    if resume_from is None:
        return None
    return checkpoint.verified_resume(resume_from, args.resume == "auto", cfg.output_dir)  # before anything is loaded


def open_output_dir(cfg: RunConfig, args: argparse.Namespace) -> None:
    """Rank 0, before the job lock: ``--resume auto`` on a folder that never held a run is refused (a typo in
    output_dir must not silently retrain from scratch); any other run creates the folder."""
    out = Path(cfg.output_dir)
    if args.resume != "auto":
        make_output_dir(out)
    elif not (checkpoint.list_checkpoints(out) or (out / "config.json").is_file() or joblock.lock_path(out).is_file()):
        raise no_run_to_resume(out)


def prepare_output_dir(cfg: RunConfig, args: argparse.Namespace, rank: int) -> Path | None:
    """Under the job lock: refuse to mix two runs in one output_dir; return the checkpoint to resume from, if any."""
    out = Path(cfg.output_dir)
    existing = checkpoint.list_checkpoints(out)
    if args.resume == "auto":
        return resume_auto(out)
    if args.resume:
        path = Path(args.resume)
        checkpoint.read_meta(path)  # refuses a missing or half-written folder
        return path
    if existing and not args.overwrite:
        raise RunError(
            f"output_dir {out} already holds checkpoints ({existing[-1].name}); pass --resume auto to continue that run, "
            f"--overwrite to start afresh there, or choose another output_dir"
        )
    if existing and rank == 0:  # --overwrite: nothing of the old run may mix with the new one
        for leftover in (checkpoint.checkpoint_root(out), out / "tensorboard", out / "final", static_logps.cache_dir(out)):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in (out / "final_metrics.json", out / "eval_logps.jsonl", out / "config.json"):
            leftover.unlink(missing_ok=True)
    return None


def resume_auto(out: Path) -> Path | None:
    """The newest complete checkpoint; none yet in a folder where this run started is step 0, none in a folder
    that never held a run is refused (a typo in output_dir must not silently retrain from scratch)."""
    latest = checkpoint.latest_checkpoint(out)
    if latest is None and not (out / "config.json").is_file():
        raise no_run_to_resume(out)
    if latest is None:
        log.warning("--resume auto: no checkpoint in %s yet (the run there stopped before its first save); "
                    "starting from step 0", out)
    return latest


def no_run_to_resume(out: Path) -> RunError:
    return RunError(f"--resume auto: output_dir {out} holds no run to resume (no checkpoints, no config.json); check "
                    f"output_dir for a typo, or leave out --resume to start a new run there")


def make_output_dir(out: Path) -> Path:
    """Create ``output_dir`` (rank 0), or say why it cannot be."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError, PermissionError) as exc:
        raise RunError(
            f"output_dir {out} cannot be created: {exc.strerror} ({exc.filename}); a part of that path is a "
            f"regular file, or not writable. Choose another output_dir"
        ) from None
    return out


def load_examples(tokenizer, cfg: RunConfig, plugins: ActivePlugins):
    """The train and eval splits, tokenized once per run and cached (aligner/data/prepare.py)."""
    train_set, eval_set = prepare_data(cfg, tokenizer)
    for key, split in (("data.train", train_set), ("data.eval", eval_set)):
        pair_only = pair_only_losses(plugins, cfg) if split and isinstance(split[0], UnpairedExample) else []
        if pair_only:
            raise DataError(
                f"dataset {key} ({getattr(cfg.data, key[5:])}) is unpaired (prompt, completion, label), but the loss "
                f"'{', '.join(pair_only)}' trains on preference pairs (prompt, chosen, rejected); use losses that take "
                f"unpaired data (e.g. --plugins kto) or paired data"
            )
    return train_set, eval_set


def summarize(examples: list, label: str) -> DatasetSummary:
    """Counts of the training set for the ``aligner_train_data`` hook."""
    if isinstance(examples[0], UnpairedExample):
        n_good = sum(ex.desirable for ex in examples)
        return DatasetSummary(label, False, len(examples), n_good, len(examples) - n_good)
    return DatasetSummary(label, True, len(examples), len(examples), len(examples))


def model_paths(cfg: RunConfig, plan: ModelPlan) -> dict[str, Path]:
    """The checkpoint folder of every model in the plan (the policy's first: it may be built by rank 0 only)."""
    # Rank 0 fetches (a Hub ID) or builds (an embedded model) first; the others wait and read it.
    policy_path = loading.resolve_path(cfg.model.name_or_path, "model.name_or_path", cfg.model.revision)
    keys = {"reference": "model.reference_path", "anchor": "anchor path (from its plugin)"}
    paths = {"policy": policy_path}
    for spec in plan.frozen():
        paths[spec.name] = (policy_path if spec.source == POLICY_INITIAL
                            else loading.resolve_path(spec.source, keys[spec.name], cfg.model.revision))
    return paths


def build_engines(cfg: RunConfig, plan: ModelPlan, paths: dict[str, Path], mpu=None) -> Engines:
    """The policy's training engine and an inference engine for each ``live`` model of the plan; a model that
    ``shares`` another's is that engine. ``mpu``: DeepSpeed's sequence-parallel groups (aligner/scoring/sequence_parallel.py)."""
    from aligner.models.lora import REFERENCE_ADAPTER, PolicyView

    problem = loading.host_adam_problem() if cfg.train.offload_optimizer else "not offloaded"
    if cfg.train.offload_optimizer and rank_and_world()[0] == 0:
        log.info("offloaded optimizer: %s", "DeepSpeedCPUAdam" if problem is None else
                 f"torch.optim.AdamW, the slow fallback ({problem})")
    ds_conf = loading.deepspeed_config(cfg, cpu_adam=problem is None)
    reference_adapter = any(spec.adapters == "reference" for spec in plan.frozen())
    built = {"policy": loading.build_policy_engine(paths["policy"], cfg, ds_conf, reference_adapter, mpu)}
    for spec in plan.with_state("live", own=False):
        if spec.shares == "policy":  # under LoRA: the policy engine, its adapters off or switched (aligner/models/lora.py)
            built[spec.name] = PolicyView(built["policy"], REFERENCE_ADAPTER if spec.adapters == "reference" else None)
            continue
        if spec.shares:
            built[spec.name] = built[spec.shares]
            continue
        if cfg.model.lora is not None and spec.source != POLICY_INITIAL and rank_and_world()[0] == 0:
            log.info("model.lora: the %s (%s) is another model than the policy's base, so it gets an engine of its "
                     "own (a second copy of the weights)", spec.name, spec.source)
        fp32 = spec.dtype == "float32"  # a moved reference (aligner/reference/trust_region.py: bf16 loses small updates)
        built[spec.name] = loading.build_frozen_engine(paths[spec.name], cfg, loading.frozen_deepspeed_config(ds_conf, fp32=fp32),
                                                      fp32=fp32, mpu=mpu)
    return Engines(**built)


def scoring(path: batch_path.BatchPath, layout: sequence_parallel.Layout) -> dict[str, Any]:
    """How a run scores a batch, all that a log-prob depends on beside the weights and the tokens: the batch path
    without its reasons (dtype, attention and kernel, packed/padded, prefix sharing, the chunked head) and the
    ranks per sequence. The static cache's fingerprint (aligner/scoring/static_logps.py)."""
    decided = path.to_dict()
    return {k: v for k, v in decided.items() if k not in ("fallbacks", "kernel_fallbacks")} | {
        "sequence_parallel": layout.size}


def cache_static_models(cfg: RunConfig, plan: ModelPlan, paths: dict[str, Path], splits: dict,
                        pad_id: int, path: batch_path.BatchPath,
                        layout: sequence_parallel.Layout | None = None) -> dict[str, static_logps.StaticLogps]:
    """The log-prob caches of the plan's ``cached`` models (models with the same checkpoint share one), scored on
    the run's batch ``path``; under sequence parallelism (``layout``) the pre-pass shards its rows like the steps."""
    cached = {spec.name: paths[spec.name] for spec in plan.with_state("cached", own=False)}
    if not cached:
        return {}
    frozen_conf = loading.frozen_deepspeed_config(loading.deepspeed_config(cfg))
    t = cfg.train
    layout = layout or sequence_parallel.Layout()
    return static_logps.prepare(
        cached, splits, cfg.output_dir, scoring(path, layout), cfg.eval.batch_size, pad_id,
        build_engine=lambda model_path: loading.build_frozen_engine(model_path, cfg, frozen_conf, mpu=layout.mpu),
        train_batch_size=t.micro_batch_size, chunk_tokens=t.logps_chunk_tokens,
        collate=sequence_parallel.shard_collate(make_collate(t.packing, pad_id, False, cfg.data.max_length,
                                                             t.prefix_sharing, layout.size > 1), pad_id, layout))


def what_was_built(plan: ModelPlan, engines: Engines, static: dict) -> dict[str, dict]:
    """Per model of the plan, what the run holds, read from the objects themselves (for ``plan.json``)."""
    out = {}
    for name in plan.models:
        engine = getattr(engines, name)
        if engine is not None:
            holds, dtype = "engine", str(next(engine.module.parameters()).dtype).removeprefix("torch.")
            shares = "reference" if name == "anchor" and engine is engines.reference else getattr(engine, "shares", None)
        elif name in static:
            holds, dtype = "cache", None
            shares = "reference" if name == "anchor" and static.get("reference") is static[name] else None
        else:
            holds, dtype, shares = "nothing", None, None
        out[name] = {"holds": holds, "shares": shares, "dtype": dtype}
    return out


def checkpoint_meta(cfg: RunConfig, plugins: ActivePlugins, world: int, policy_path: Path) -> dict:
    """What a checkpoint records of its run, and what a resume must match (see checkpoint.check_compatible)."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(policy_path, trust_remote_code=cfg.model.trust_remote_code)
    return {"model": cfg.model.name_or_path, "architecture": checkpoint.architecture(model_config),
            "plugins": sorted(plugins.training), "world_size": world, "zero_stage": cfg.train.zero_stage,
            "lora": cfg.to_dict()["model"]["lora"], "sequence_parallel": cfg.train.sequence_parallel}


def is_paired(*splits: list) -> bool:
    return not any(split and isinstance(split[0], UnpairedExample) for split in splits)


class Recipe:
    """One training run, top to bottom: :meth:`setup` -> :meth:`train` (one :meth:`train_step` per optimizer
    step, :meth:`after_step` deciding what happens between steps) -> :meth:`finish` (save, eval, export).

    Every piece of the run's state is an attribute set in :meth:`setup`.
    """

    def __init__(self, cfg: RunConfig, plugins: ActivePlugins, args: argparse.Namespace) -> None:
        self.cfg, self.plugins, self.args = cfg, plugins, args
        self.out = Path(cfg.output_dir)
        self.final_metrics: dict[str, float] = {}

    # -- setup: config, plugins, plan, data, engines ------------------------------------------------------------
    def setup(self) -> Recipe:
        cfg = self.cfg
        launched = "LOCAL_RANK" in os.environ  # set by deepspeed and torchrun, before init_distributed fills it in
        loading.init_distributed(cfg.train.dist_timeout_s)
        self.rank, self.world = rank_and_world()
        self.layout = sequence_parallel.layout_for(cfg, self.rank, self.world)  # refuses what cannot be sharded
        self.stopwatch = preempt.StopWatch(self.rank, cfg.train.save_every_minutes)
        self.stopwatch.install(launched)
        teardown.register(self.stopwatch.close)
        self.resume_from = claim_output_dir(cfg, self.args, self.rank, self.world)
        torch.manual_seed(cfg.train.seed)
        plan_without_data = make_plan(cfg, self.plugins)  # the sources; paired or not is known once data is loaded
        self.paths = model_paths(cfg, plan_without_data)
        self.tokenizer = loading.run_tokenizer(cfg, self.paths["policy"])
        self.pad_id = self.tokenizer.pad_token_id
        self.meta = checkpoint_meta(cfg, self.plugins, self.world, self.paths["policy"])
        self.resume_meta = checkpoint.read_meta(self.resume_from) if self.resume_from is not None else None
        if self.resume_meta is not None:  # refuse a checkpoint of another run before building anything
            checkpoint.check_compatible(self.resume_from, self.resume_meta, self.meta)
        self.setup_data()
        paired = is_paired(self.train_set, self.eval_set)
        self.path = batch_path.decide_for_run(cfg, self.paths["policy"], paired,
                                              "kl_pairs" in self.plugins.required_inputs(cfg))
        self.cfg = cfg = self.path.apply(cfg)  # everything from here reads the dtype and switches as decided
        self.plan = make_plan(cfg, self.plugins, paired_data=paired)
        if self.rank == 0:
            log.info("batch path: %s", self.path.describe())
        self.layout = sequence_parallel.setup(cfg, self.path, self.paths["policy"], self.layout)
        if self.rank == 0 and self.layout.size > 1:
            log.info("sequence parallel: %s", self.layout.describe())
        self.start_loggers()
        self.setup_models()
        self.start_step = self.restore() if self.resume_from is not None else 0
        self.collate = sequence_parallel.shard_collate(
            make_collate(cfg.train.packing, self.pad_id, self.plan.needs("kl_pairs"), cfg.data.max_length,
                         cfg.train.prefix_sharing, self.layout.size > 1), self.pad_id, self.layout)
        return self

    def start_loggers(self) -> None:
        """Rank 0 opens every logger's run (``report_to``) before any engine is built: the config, the plan, the
        plugins' versions, and on resume what each kept in the checkpoint (its run id). A failure stops the run."""
        cfg, resumed = self.cfg, self.resume_meta or {}
        self.loggers = Loggers(self.plugins, cfg, self.rank)
        teardown.register(self.loggers.close)
        run = RunStart(self.out, cfg.to_dict(), self.plan.to_dict(), dict(self.plugins.versions),
                       int(resumed.get("step", 0)))
        lockstep.on_rank_zero(lambda: self.loggers.start(run, resumed.get("loggers")), USER_ERRORS + (RunError,))
        if self.rank == 0 and self.plugins.loggers:
            log.info("reporting to %s", ", ".join(self.plugins.loggers))

    def setup_data(self) -> None:
        cfg = self.cfg
        self.train_set, self.eval_set = load_examples(self.tokenizer, cfg, self.plugins)
        try:  # too few rows for one step: the same on every rank, before any engine is built
            # The data is sharded over the data-parallel groups: the ranks that share a sequence draw alike.
            self.sampler = PairSampler(len(self.train_set), cfg.train.micro_batch_size, self.layout.dp_rank,
                                       self.layout.dp_world,
                                       cfg.train.seed, cfg.data.shuffle,
                                       example_lengths(self.train_set) if cfg.train.balance_ranks else None)
        except ValueError as exc:
            raise DataError(f"data.train ({cfg.data.train}): {exc}") from None
        # The reward-model judge (eval.reward_model) is loaded now, so a bad one is refused before the engines.
        self.judge = RewardJudge(cfg, self.tokenizer, self.rank) if cfg.eval.reward_model else None
        lockstep.on_rank_zero(self.describe_run, USER_ERRORS + (RunError,))

    def describe_run(self) -> None:
        """Rank 0: the plugins' look at the training set, ``output_dir/config.json`` and the run's one-line summary."""
        cfg = self.cfg
        self.plugins.call_each("aligner_train_data", summary=summarize(self.train_set, f"data.train ({cfg.data.train})"),
                               config=cfg)
        (make_output_dir(self.out) / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        warn_if_push_cannot_work(cfg.export)
        log.info("plugins: %s; %d train pairs, %d eval pairs, %d ranks", ", ".join(self.plugins.training),
                 len(self.train_set), len(self.eval_set), self.world)

    def setup_models(self) -> None:
        """The static caches first (their pre-pass runs before the policy exists), then the engines."""
        static = cache_static_models(self.cfg, self.plan, self.paths,
                                     {"train": self.static_train_examples(), "eval": self.eval_set}, self.pad_id,
                                     self.path, self.layout)
        self.engines = build_engines(self.cfg, self.plan, self.paths, self.layout.mpu)
        self.policy = self.engines.policy
        self.train_static = {name: cache.split("train") for name, cache in static.items()}
        self.eval_static = {name: cache.split("eval") for name, cache in static.items()}
        built = what_was_built(self.plan, self.engines, static)  # collective-free: read from the objects
        if self.rank == 0:
            engines = [m for m in ("policy", "reference", "anchor") if getattr(self.engines, m) is not None]
            shared = [f"{m} = reference, one engine" if b["shares"] == "reference" else
                      f"{m} = {self.plan.get(m).adapters_text()}, no engine of its own"
                      for m, b in built.items() if b["holds"] == "engine" and b["shares"]]
            log.info("models built: %s%s", ", ".join(engines), f" ({'; '.join(shared)})" if shared else "")
            log.info("model plan: %s", self.plan.describe())
            write_plan(self.plan, built, self.out, batch_path=self.path.to_dict())

    def static_train_examples(self) -> list:
        """The train examples the static pre-pass scores: those the steps still to run will draw (from the resumed
        step on), not the whole split; all of it with ``train.on_nonfinite: skip``, whose skips draw more."""
        cfg = self.cfg
        if cfg.train.on_nonfinite == "skip":
            return self.train_set
        done = int(self.resume_meta["step"]) if self.resume_meta is not None else 0
        accum = cfg.train.grad_accum
        needed = self.sampler.examples_of(done * accum, max(0, cfg.train.max_steps - done) * accum)
        return [self.train_set[i] for i in sorted(needed)]

    def restore(self) -> int:
        """Load the checkpoint being resumed into the engines, the sampler, the plugins and the RNG; its step."""
        state = checkpoint.load(self.policy, self.resume_from, trainable_only=self.cfg.model.lora is not None)
        self.sampler.load_state_dict(state["sampler"])
        for name, plugin_state in state.get("plugins", {}).items():
            self.plugins.call_one(name, "aligner_load_state_dict", state=plugin_state)
        self.plugins.call_each("aligner_load_checkpoint", directory=self.resume_from, engines=self.engines, config=self.cfg)
        checkpoint.set_rng_state(state["rng"])
        if self.rank == 0:
            log.info("resumed from %s at step %d", self.resume_from, int(state["step"]))
        return int(state["step"])

    # -- the loop ----------------------------------------------------------------------------------------------
    def train(self) -> int:
        """Every optimizer step from the start (or the resumed step) to ``train.max_steps``; the last step done."""
        cfg = self.cfg
        if self.start_step == 0:
            self.run_eval(0)
        self.batches = iter(self.sampler)
        self.meter = perf.PerfMeter(self.engines, cfg.model.dtype)
        self.check_each_loss = nonfinite.checks_each_loss(self.policy, cfg.train.on_nonfinite)
        bar = progress_bar(cfg.train.max_steps, self.start_step, self.rank)
        teardown.register(bar.close)
        step = self.start_step
        for step in range(self.start_step + 1, cfg.train.max_steps + 1):
            values = self.train_step(step)
            bar.set_postfix(loss=f"{values['train/loss']:.4f}", acc=f"{values.get('rewards/accuracies', float('nan')):.2f}")
            bar.update(1)
            self.after_step(step)
        bar.close()
        return step

    def logged(self, step: int) -> bool:
        return step % self.cfg.train.log_every == 0 or step == self.cfg.train.max_steps

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step over ``train.grad_accum`` micro-batches, the after-step hooks, and its metrics."""
        cfg, started = self.cfg, time.perf_counter()
        self.meter.start()
        metrics = StepMetrics()
        resume_point = (self.sampler.state_dict(), checkpoint.rng_state())  # for a stop before this step's update
        skipped, losses, done = 0, [], 0
        while done < cfg.train.grad_accum:
            batch = self.collate([self.train_set[i] for i in next(self.batches)])
            inputs = gather_inputs(batch, self.engines, self.train_static, cfg.train.logps_chunk_tokens, self.plan)
            loss, step_metrics = total_loss(self.plugins, inputs, cfg)
            if self.check_each_loss and not nonfinite.loss_is_finite(loss):  # every rank agrees: all skip or stop
                skipped = self.skip_nonfinite(step, skipped, batch, loss, resume_point)
                continue
            losses.append((loss.detach(), batch.ids))
            self.policy.backward(loss)
            if done == cfg.train.grad_accum - 1 and not nonfinite.step_is_finite(self.policy, [l for l, _ in losses]):
                self.stop_on_nonfinite_step(step, losses, resume_point)
            self.policy.step()
            done += 1
            metrics.add(step_metrics)
            self.meter.count(batch)
        logged = self.logged(step)
        after = {}
        for _, result in self.plugins.call_each("aligner_after_optimizer_step", step=step, engines=self.engines,
                                                config=cfg, logged=logged):
            after.update(result or {})
        values = reduce_mean(metrics.means())
        values.update(self.meter.step_metrics(time.perf_counter() - started))
        values.update(after)
        values["lr"] = self.policy.get_lr()[0]
        if cfg.train.on_nonfinite == "skip":
            values["train/nonfinite_skipped"] = float(skipped)
        values["grad_norm"] = float(self.policy.get_global_grad_norm() or 0.0)
        if logged:
            self.loggers.log(step, values)
        self.final_metrics.update(values)
        return values

    def after_step(self, step: int) -> None:
        """The one place, per optimizer step, that decides what happens before the next: eval, save, stop.

        A stop request (SIGTERM/SIGUSR1, a dead launcher: aligner/training/preempt.py) and the wall-clock save
        (``train.save_every_minutes``) get the same answer on every rank, once per optimizer step.
        """
        cfg = self.cfg
        if step == cfg.train.max_steps:
            return  # finish() saves, evaluates and exports the last step
        if cfg.eval.every and step % cfg.eval.every == 0:
            self.run_eval(step)
        stop, save_by_clock = self.stopwatch.decide()
        if stop or save_by_clock or (cfg.train.save_every and step % cfg.train.save_every == 0):
            self.save(step)
        if stop:
            raise preempt.Preempted(step, checkpoint.checkpoint_root(self.out) / f"step_{step}", self.stopwatch.reasons())

    def skip_nonfinite(self, step: int, skipped: int, batch: Batch, loss: torch.Tensor, resume_point: tuple) -> int:
        """A micro-batch with a non-finite loss: stop (``train.on_nonfinite: stop``, or too many) or skip it."""
        bad_ids = nonfinite.ids_on_all_ranks([] if torch.isfinite(loss).all() else batch.ids)
        if self.cfg.train.on_nonfinite == "stop" or skipped >= MAX_SKIPPED_PER_STEP:
            self.stop_nonfinite(step, "loss", bad_ids, resume_point)
        if self.rank == 0:
            log.warning("step %d: non-finite loss, micro-batch skipped (examples %s)", step, ", ".join(bad_ids))
        return skipped + 1

    def stop_on_nonfinite_step(self, step: int, losses: list[tuple[torch.Tensor, list[str]]], resume_point: tuple) -> None:
        """A non-finite loss or gradient at the step's end: stop, naming the micro-batches whose loss was not finite
        (on any rank), else every example of the step (collective: every rank gets here together)."""
        bad = nonfinite.ids_on_all_ranks([i for loss, ids in losses if not torch.isfinite(loss).all() for i in ids])
        if bad:
            self.stop_nonfinite(step, "loss", bad, resume_point)
        self.stop_nonfinite(step, "gradient", nonfinite.ids_on_all_ranks([i for _, ids in losses for i in ids]),
                            resume_point)

    def stop_nonfinite(self, step: int, what: str, ids: list[str], resume_point: tuple[dict, dict]) -> None:
        """Save the state after step - 1 (the step's update is not applied) and stop with the step and examples."""
        if not checkpoint.is_complete(checkpoint.checkpoint_root(self.out) / f"step_{step - 1}"):
            self.save(step - 1, *resume_point)
        raise nonfinite.NonFiniteError(
            f"non-finite {what} at step {step} (examples {', '.join(ids)}); saved checkpoint step_{step - 1} "
            f"(the state before this step). Check those examples and the learning rate, then resume with "
            f"--resume auto, or set train.on_nonfinite=skip to drop such micro-batches"
        )

    # -- eval, save, export ------------------------------------------------------------------------------------
    def run_eval(self, step: int) -> None:
        if not self.eval_set:
            return
        metrics, inputs = evaluate(self.plugins, self.engines, self.eval_set, self.cfg, self.pad_id, self.eval_static, self.plan)
        if self.judge is not None:
            metrics.update(self.judge.evaluate(self.policy.module))
        self.loggers.log(step, metrics)
        self.final_metrics.update(metrics)
        if self.rank == 0:  # per-example policy log-probs, to check an exported model against the engine
            write_eval_logps(self.out / "eval_logps.jsonl", inputs, step)

    def save(self, step: int, sampler_state: dict | None = None, rng: dict | None = None) -> None:
        plugins = self.plugins
        states = {name: s for name, s in plugins.call_each("aligner_state_dict") if s is not None}
        client = {"step": step, "sampler": sampler_state or self.sampler.state_dict(), "plugins": states}
        checkpoint.save(self.policy, self.out, step, client, write_extra=lambda folder: plugins.call_each(
            "aligner_save_checkpoint", directory=folder, engines=self.engines, config=self.cfg),
            meta={**self.meta, "loggers": self.loggers.states()}, keep_last=self.cfg.train.keep_last, rng=rng,
            trainable_only=self.cfg.model.lora is not None)
        self.stopwatch.saved()

    def finish(self, step: int) -> dict[str, float]:
        """The last checkpoint, the final eval, the HF export with its model card; then, on rank 0, the push to the
        Hub and the loggers' end of run. A failed push raises :class:`PushError` once everything else is done."""
        cfg = self.cfg
        if step > self.start_step or not checkpoint.list_checkpoints(self.out):
            self.save(step)
        self.run_eval(step)
        final = self.out / "final"
        merged = final / "merged" if cfg.model.lora is not None and cfg.export.merge_lora else None
        if cfg.model.lora is None:
            checkpoint.export_hf(self.policy, self.tokenizer, final)
        else:
            from aligner.models import lora_export

            lora_export.export_adapter(self.policy, self.tokenizer, final, merged_from=self.paths["policy"] if merged else None,
                                       dtype=loading.torch_dtype(cfg.model.dtype))
        if self.rank != 0:
            return self.final_metrics
        (self.out / "final_metrics.json").write_text(json.dumps(self.final_metrics, indent=2, sort_keys=True))
        card.write_cards(final, merged, card.card_facts(cfg, self.plugins, self.world, self.paths["policy"],
                                                       self.final_metrics))
        images = report_plots(self.out) if self.loggers.wants_final() else []
        hub_url, failure = None, None
        if cfg.export.push_to_hub:
            try:
                hub_url = push_to_hub(final, cfg.export)
            except PushError as exc:
                failure = exc
        self.loggers.final(RunSummary(step, dict(self.final_metrics), images, final, merged, hub_url,
                                      str(failure) if failure else None))
        self.loggers.close("finished")
        if failure is not None:
            raise failure
        return self.final_metrics


def write_eval_logps(path: Path, inputs, step: int) -> None:
    """Per-example policy log-probs of the eval split (paired: chosen and rejected; unpaired: one completion)."""
    with path.open("w") as f:
        if inputs.paired:
            for i, example_id in enumerate(inputs.example_ids):
                f.write(json.dumps({"id": example_id, "step": step, "chosen": float(inputs.policy.chosen[i]),
                                    "rejected": float(inputs.policy.rejected[i])}) + "\n")
        else:  # unpaired: ids of the desirable completions, then of the undesirable ones
            values = torch.cat([inputs.policy.chosen, inputs.policy.rejected])
            for i, example_id in enumerate(inputs.example_ids):
                f.write(json.dumps({"id": example_id, "step": step, "label": i < len(inputs.policy.chosen),
                                    "completion": float(values[i])}) + "\n")


def run(cfg: RunConfig, plugins: ActivePlugins, args: argparse.Namespace) -> dict[str, float]:
    """The recipe: setup, the loop, then save, eval and export. The loggers are closed with how the run ended."""
    recipe = Recipe(cfg, plugins, args).setup()
    try:
        last_step = recipe.train()
        return recipe.finish(last_step)
    except preempt.Preempted:
        recipe.loggers.close("stopped")
        raise
    except PushError:
        raise  # trained and exported: finish() closed the loggers as finished
    except BaseException:
        recipe.loggers.close("failed")
        raise


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    if args.list_plugins:
        print(list_plugins_table())
        return 0
    cfg, code = None, 1
    try:
        cfg, plugins = configure(args)
        run(cfg, plugins, args)
        code = 0
    except USER_ERRORS + (RunError,) as exc:
        code = report(2, f"aligner: error: {exc}")
    except nonfinite.NonFiniteError as exc:
        code = report(3, f"aligner: stopped: {exc}")
    except preempt.Preempted as exc:
        code = report(preempt.EXIT_PREEMPTED, f"aligner: {exc}")
    except PushError as exc:
        code = report(EXIT_PUSH_FAILED, f"aligner: trained, but the push to the Hub failed: {exc}")
    except KeyboardInterrupt:  # Ctrl-C before the stop handling was installed (aligner/training/preempt.py): nothing to save
        code = report(preempt.EXIT_INTERRUPTED, "aligner: interrupted (Ctrl-C) while starting; nothing was saved")
    except RuntimeError as exc:
        if cfg is None or not lost_peer(exc):
            raise
        print(lost_peer_message(exc, cfg), file=sys.stderr)  # every surviving rank says it: any may be the one left
        code = 4
    finally:
        teardown.shutdown(min(teardown.WAIT_S, cfg.train.dist_timeout_s) if cfg is not None else teardown.WAIT_S)
    return code


def report(code: int, line: str) -> int:
    """Rank 0 prints the run's outcome (every rank has the same); return the exit code."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(line, file=sys.stderr)
    return code


#: Collective errors that are this rank's own mistake (a tensor on the wrong device for the backend), not a lost
#: peer: they keep their traceback, which names the cause.
MISUSE = ("No backend type associated with device type", "backend constrained to", "ncclInvalidUsage",
          "invalid usage", "Tensors must be CUDA", "Expected all tensors to be on the same device")


def lost_peer(exc: BaseException) -> bool:
    """A collective failed because another rank of the job died or hung (gloo/NCCL transport error or timeout)."""
    text = str(exc)
    if any(k in text for k in MISUSE):
        return False
    return isinstance(exc, dist.DistError) or any(k in text for k in ("gloo/transport", "NCCL", "Connection reset by peer",
                                                                      "Connection closed by peer", "Timed out waiting"))


def lost_peer_message(exc: BaseException, cfg: RunConfig) -> str:
    """What a surviving rank prints instead of the transport's traceback: what happened, what is safe, what to do."""
    latest = checkpoint.latest_checkpoint(Path(cfg.output_dir))
    saved = (f"the last complete checkpoint, {latest}, is intact: fix the cause, then rerun with --resume auto"
             if latest else f"no checkpoint was published in {cfg.output_dir} yet: rerun from the start")
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"aligner: error: rank {os.environ.get('RANK', '0')} lost contact with another rank of this job "
            f"({first_line[:300]}). Another process died or hung; its own log says why (look for a traceback, "
            f"an out-of-memory kill, or a signal). {saved}")


if __name__ == "__main__":
    sys.exit(main())
