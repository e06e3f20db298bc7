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

import torch
import torch.distributed as dist

from aligner import attention, checkpoint, models, nonfinite, perf, static_logps
from aligner.config import ConfigError, RunConfig, apply_overrides, build_config, read_yaml
from aligner.data import DataError, PairSampler, UnpairedExample, make_collate, prepare_data
from aligner.eval import evaluate
from aligner.hookspecs import DatasetSummary, Engines
from aligner.logging import StepMetrics, TensorBoardLogger, progress_bar, reduce_mean
from aligner.registry import ActivePlugins, PluginError, PluginHookError, activate, available_plugins, list_plugins_table
from aligner.step import gather_inputs, total_loss

log = logging.getLogger("aligner")
#: With ``train.on_nonfinite: skip``, a step that meets more non-finite micro-batches than this stops the run.
MAX_SKIPPED_PER_STEP = 8
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"


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
    names = raw.get("plugins") or ["dpo"]
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    plugins = activate(names)
    raw["plugins"] = list(plugins.infos)
    sections = plugins.config_sections()
    inactive = {}
    for name, ap in available_plugins().items():
        if name not in plugins.infos:
            try:
                section = getattr(ap.load(), "aligner_config_section", lambda: None)()
            except PluginError:
                continue
            if section:
                inactive[section[0]] = name
    return build_config(raw, sections, inactive, source=str(config_path)), plugins


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def prepare_output_dir(cfg: RunConfig, args: argparse.Namespace, rank: int) -> Path | None:
    """Refuse to mix two runs in one output_dir; return the checkpoint to resume from, if any."""
    out = Path(cfg.output_dir)
    existing = checkpoint.list_checkpoints(out)
    if args.resume == "auto":
        return checkpoint.latest_checkpoint(out)
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


def load_examples(tokenizer, cfg: RunConfig, plugins: ActivePlugins):
    """The train and eval splits, tokenized once per run and cached (aligner/data/prepare.py)."""
    train_set, eval_set = prepare_data(cfg, tokenizer)
    for key, split in (("data.train", train_set), ("data.eval", eval_set)):
        if split and isinstance(split[0], UnpairedExample) and "unpaired" not in plugins.required_inputs(cfg):
            raise DataError(
                f"dataset {key} ({getattr(cfg.data, key[5:])}) is unpaired (prompt, completion, label), but the loss "
                f"'{plugins.loss}' trains on preference pairs (prompt, chosen, rejected); use a loss that takes unpaired "
                f"data (e.g. --plugins kto) or paired data"
            )
    return train_set, eval_set


def summarize(examples: list, label: str) -> DatasetSummary:
    """Counts of the training set for the ``aligner_train_data`` hook."""
    if isinstance(examples[0], UnpairedExample):
        n_good = sum(ex.desirable for ex in examples)
        return DatasetSummary(label, False, len(examples), n_good, len(examples) - n_good)
    return DatasetSummary(label, True, len(examples), len(examples), len(examples))


def frozen_model_paths(cfg: RunConfig, plugins: ActivePlugins, policy_path: Path) -> dict[str, Path]:
    """The checkpoint of each frozen or updated model some plugin asked for (``reference``, ``anchor``)."""
    keys = {"reference": "model.reference_path", "anchor": "anchor path (from its plugin)"}
    paths: dict[str, Path] = {}
    for name in sorted(plugins.required_models(cfg)):
        chosen = plugins.hook.aligner_model_path(model=name, config=cfg)
        chosen = chosen or (cfg.model.reference_path if name == "reference" else None)
        paths[name] = models.resolve_path(chosen, keys[name], cfg.model.revision) if chosen else policy_path
    return paths


def build_engines(cfg: RunConfig, plugins: ActivePlugins, policy_path: Path, paths: dict[str, Path],
                  cached: set[str] = frozenset()) -> Engines:
    """Build only the models some plugin asked for and no cache serves; one engine when reference and
    anchor are the same weights."""
    ds_conf = models.deepspeed_config(cfg)
    frozen_conf = models.frozen_deepspeed_config(ds_conf)
    policy = models.build_policy_engine(policy_path, cfg, ds_conf)
    reference = anchor = None
    if "reference" in paths and "reference" not in cached:
        # A reference that a plugin moves is kept in fp32 (aligner/trust_region.py: bf16 loses small updates).
        moving = plugins.reference_update is not None
        reference = models.build_frozen_engine(paths["reference"], cfg, models.frozen_deepspeed_config(ds_conf, fp32=moving),
                                               fp32=moving)
    if "anchor" in paths and "anchor" not in cached:
        # While nothing moves the reference and both come from the same checkpoint, they are
        # the same weights: share one engine instead of building two.
        if reference is not None and plugins.reference_update is None and paths["anchor"] == paths["reference"]:
            anchor = reference
        else:
            anchor = models.build_frozen_engine(paths["anchor"], cfg, frozen_conf)
    return Engines(policy=policy, reference=reference, anchor=anchor)


def cache_static_models(cfg: RunConfig, plugins: ActivePlugins, paths: dict[str, Path], splits: dict,
                        pad_id: int) -> dict[str, static_logps.StaticLogps]:
    """Cached log-probs of the models that never change: the anchor, and the reference while no plugin moves it."""
    if not cfg.train.cache_static_logps or any(isinstance(split[0], UnpairedExample) for split in splits.values() if split):
        return {}  # the cache holds paired examples only
    # The reference stays live when a plugin moves it, or when a loss needs it on the step's mismatched pairs (kto).
    live_reference = plugins.reference_update is not None or "kl_pairs" in plugins.required_inputs(cfg)
    static = {n: p for n, p in paths.items() if n == "anchor" or not live_reference}
    frozen_conf = models.frozen_deepspeed_config(models.deepspeed_config(cfg))
    return static_logps.prepare(
        static, splits, cfg.output_dir, cfg.model.dtype, attention.attn_implementation(cfg.model.attn_implementation, cfg.train.packing),
        cfg.eval.batch_size, pad_id, build_engine=lambda path: models.build_frozen_engine(path, cfg, frozen_conf),
        train_batch_size=cfg.train.micro_batch_size, chunk_tokens=cfg.train.logps_chunk_tokens)


def checkpoint_meta(cfg: RunConfig, plugins: ActivePlugins, world: int, policy_path: Path) -> dict:
    """What a checkpoint records of its run, and what a resume must match (see checkpoint.check_compatible)."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(policy_path, trust_remote_code=cfg.model.trust_remote_code)
    return {"model": cfg.model.name_or_path, "architecture": checkpoint.architecture(model_config),
            "plugins": sorted(plugins.infos), "world_size": world, "zero_stage": cfg.train.zero_stage}


def run(cfg: RunConfig, plugins: ActivePlugins, args: argparse.Namespace) -> dict[str, float]:
    models.init_distributed(cfg.train.dist_timeout_s)
    rank, world = rank_and_world()
    out = Path(cfg.output_dir)
    resume_from = prepare_output_dir(cfg, args, rank)
    torch.manual_seed(cfg.train.seed)

    # Rank 0 fetches (a Hub ID) or builds (an embedded model) first; the others wait and read it.
    policy_path = models.resolve_path(cfg.model.name_or_path, "model.name_or_path", cfg.model.revision)
    tokenizer = models.run_tokenizer(cfg, policy_path)
    meta = checkpoint_meta(cfg, plugins, world, policy_path)
    if resume_from is not None:  # refuse a checkpoint of another run before building anything
        checkpoint.check_compatible(resume_from, checkpoint.read_meta(resume_from), meta)

    train_set, eval_set = load_examples(tokenizer, cfg, plugins)
    if rank == 0:
        plugins.call_each("aligner_train_data", summary=summarize(train_set, f"data.train ({cfg.data.train})"), config=cfg)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        log.info("plugins: %s; %d train pairs, %d eval pairs, %d ranks", ", ".join(plugins.infos), len(train_set), len(eval_set), world)

    pad_id = tokenizer.pad_token_id
    paths = frozen_model_paths(cfg, plugins, policy_path)
    static = cache_static_models(cfg, plugins, paths, {"train": train_set, "eval": eval_set}, pad_id)
    engines = build_engines(cfg, plugins, policy_path, paths, cached=set(static))
    train_static = {name: cache.split("train") for name, cache in static.items()}
    eval_static = {name: cache.split("eval") for name, cache in static.items()}
    policy = engines.policy
    if rank == 0:
        built = [m for m in ("policy", "reference", "anchor") if getattr(engines, m) is not None]
        shared = " (anchor = reference, one engine)" if engines.anchor is not None and engines.anchor is engines.reference else ""
        log.info("models built: %s%s", ", ".join(built), shared)
    kl_pairs = "kl_pairs" in plugins.required_inputs(cfg)
    sampler = PairSampler(len(train_set), cfg.train.micro_batch_size, rank, world, cfg.train.seed, cfg.data.shuffle)
    start_step = 0
    if resume_from is not None:
        state = checkpoint.load(policy, resume_from)
        start_step = int(state["step"])
        sampler.load_state_dict(state["sampler"])
        for name, plugin_state in state.get("plugins", {}).items():
            plugins.call_one(name, "aligner_load_state_dict", state=plugin_state)
        plugins.call_each("aligner_load_checkpoint", directory=resume_from, engines=engines, config=cfg)
        checkpoint.set_rng_state(state["rng"])
        if rank == 0:
            log.info("resumed from %s at step %d", resume_from, start_step)

    tb = TensorBoardLogger(out / "tensorboard", rank, purge_step=start_step + 1)
    final_metrics: dict[str, float] = {}

    def run_eval(step: int) -> None:
        if not eval_set:
            return
        metrics, inputs = evaluate(plugins, engines, eval_set, cfg, pad_id, eval_static)
        tb.log(step, metrics)
        final_metrics.update(metrics)
        if rank == 0:  # per-example policy log-probs, to check an exported model against the engine
            with (out / "eval_logps.jsonl").open("w") as f:
                if inputs.paired:
                    for i, example_id in enumerate(inputs.example_ids):
                        f.write(json.dumps({"id": example_id, "step": step, "chosen": float(inputs.policy.chosen[i]),
                                            "rejected": float(inputs.policy.rejected[i])}) + "\n")
                else:  # unpaired: ids of the desirable completions, then of the undesirable ones
                    values = torch.cat([inputs.policy.chosen, inputs.policy.rejected])
                    for i, example_id in enumerate(inputs.example_ids):
                        f.write(json.dumps({"id": example_id, "step": step, "label": i < len(inputs.policy.chosen),
                                            "completion": float(values[i])}) + "\n")

    def save(step: int, sampler_state: dict | None = None, rng: dict | None = None) -> None:
        states = {name: s for name, s in plugins.call_each("aligner_state_dict") if s is not None}
        client = {"step": step, "sampler": sampler_state or sampler.state_dict(), "plugins": states}
        checkpoint.save(policy, out, step, client, write_extra=lambda folder: plugins.call_each(
            "aligner_save_checkpoint", directory=folder, engines=engines, config=cfg),
            meta=meta, keep_last=cfg.train.keep_last, rng=rng)

    def stop_nonfinite(step: int, what: str, ids: list[str], resume_point: tuple[dict, dict]) -> None:
        """Save the state after step - 1 (the step's update is not applied) and stop with the step and examples."""
        if not checkpoint.is_complete(checkpoint.checkpoint_root(out) / f"step_{step - 1}"):
            save(step - 1, *resume_point)
        raise nonfinite.NonFiniteError(
            f"non-finite {what} at step {step} (examples {', '.join(ids)}); saved checkpoint step_{step - 1} "
            f"(the state before this step). Check those examples and the learning rate, then resume with "
            f"--resume auto, or set train.on_nonfinite=skip to drop such micro-batches"
        )

    if start_step == 0:
        run_eval(0)
    batches = iter(sampler)
    collate = make_collate(cfg.train.packing, pad_id, kl_pairs, cfg.data.max_length)
    meter = perf.PerfMeter(engines, cfg.model.dtype)
    bar = progress_bar(cfg.train.max_steps, start_step, rank)
    step = start_step
    for step in range(start_step + 1, cfg.train.max_steps + 1):
        started = time.perf_counter()
        meter.start()
        metrics = StepMetrics()
        resume_point = (sampler.state_dict(), checkpoint.rng_state())  # for a stop before this step's update
        skipped, step_ids, done = 0, [], 0
        while done < cfg.train.grad_accum:
            batch = collate([train_set[i] for i in next(batches)])
            inputs = gather_inputs(batch, engines, train_static, cfg.train.logps_chunk_tokens)
            loss, step_metrics = total_loss(plugins, inputs, cfg)
            if not nonfinite.loss_is_finite(loss):  # every rank agrees, so all skip or stop together
                bad_ids = nonfinite.ids_on_all_ranks([] if torch.isfinite(loss).all() else batch["ids"])
                if cfg.train.on_nonfinite == "stop" or skipped >= MAX_SKIPPED_PER_STEP:
                    stop_nonfinite(step, "loss", bad_ids, resume_point)
                skipped += 1
                if rank == 0:
                    log.warning("step %d: non-finite loss, micro-batch skipped (examples %s)", step, ", ".join(bad_ids))
                continue
            step_ids += batch["ids"]
            policy.backward(loss)
            if done == cfg.train.grad_accum - 1 and not nonfinite.grads_are_finite(policy):
                stop_nonfinite(step, "gradient", nonfinite.ids_on_all_ranks(step_ids), resume_point)
            policy.step()
            done += 1
            metrics.add(step_metrics)
            meter.count(batch)
        after = {}
        for _, result in plugins.call_each("aligner_after_optimizer_step", step=step, engines=engines, config=cfg):
            after.update(result or {})
        elapsed = time.perf_counter() - started
        values = reduce_mean(metrics.means())
        values.update(meter.step_metrics(elapsed))
        values.update(after)
        values["lr"] = policy.get_lr()[0]
        if cfg.train.on_nonfinite == "skip":
            values["train/nonfinite_skipped"] = float(skipped)
        values["grad_norm"] = float(policy.get_global_grad_norm() or 0.0)
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            tb.log(step, values)
        bar.set_postfix(loss=f"{values['train/loss']:.4f}", acc=f"{values.get('rewards/accuracies', float('nan')):.2f}")
        bar.update(1)
        final_metrics.update(values)
        if cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.train.max_steps:
            run_eval(step)
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step != cfg.train.max_steps:
            save(step)
    bar.close()

    if step > start_step or not checkpoint.list_checkpoints(out):
        save(step)
    run_eval(step)
    checkpoint.export_hf(policy, tokenizer, out / "final")
    if rank == 0:
        (out / "final_metrics.json").write_text(json.dumps(final_metrics, indent=2, sort_keys=True))
    tb.close()
    return final_metrics


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    if args.list_plugins:
        print(list_plugins_table())
        return 0
    cfg = None
    try:
        cfg, plugins = configure(args)
        run(cfg, plugins, args)
    except (ConfigError, PluginError, DataError, models.ModelError, RunError, PluginHookError,
            static_logps.StaticCacheError, checkpoint.CheckpointError) as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"aligner: error: {exc}", file=sys.stderr)
        return 2
    except nonfinite.NonFiniteError as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"aligner: stopped: {exc}", file=sys.stderr)
        return 3
    except RuntimeError as exc:
        if cfg is None or not lost_peer(exc):
            raise
        print(lost_peer_message(exc, cfg), file=sys.stderr)  # every surviving rank says it: any may be the one left
        return 4
    return 0


def lost_peer(exc: BaseException) -> bool:
    """A collective failed because another rank of the job died or hung (gloo/NCCL transport error or timeout)."""
    text = str(exc)
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
