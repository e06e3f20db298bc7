"""Load models and tokenizers with ``from_pretrained`` and wrap them in DeepSpeed engines.

The policy trains under the configured ZeRO stage (3 by default). The
reference and the anchor are DeepSpeed inference engines (no optimizer) with
the same partitioning; under ZeRO-3 they keep no persistent (un-partitioned)
parameters, so a shard-local update of their weights is never shadowed by a
stale full copy.
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from aligner.config import RunConfig
from aligner.data import embedded
from aligner.models import ModelError, attention, hub


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (for a rendezvous the caller starts soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: int = 1800) -> None:
    """Start torch.distributed through DeepSpeed (gloo on CPU, NCCL on GPU).

    A plain ``python launch/train.py`` (no launcher) runs as a single rank.
    """
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu" and os.environ.get("ALIGNER_CPU_SHM_COMM", "0") != "1":
        # DeepSpeed's shared-memory CPU all-reduce is a C++ op compiled at first use (~50 s on 2 cores), and a
        # process killed mid-compile leaves a lock that makes every later run wait forever. Gloo alone is enough
        # for CPU runs; ALIGNER_CPU_SHM_COMM=1 turns the op back on. DeepSpeed keeps this dict for edits
        # (deepspeed/ops/__init__.py: "edits to it persist").
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # DeepSpeed 0.19.8 calls these two deprecated torch.distributed functions every step; the warning says
    # nothing a user can act on, and it fills the log.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
                            category=FutureWarning)
    if torch.cuda.is_available():
        # Before any collective: NCCL binds this rank's communicator to its GPU, and torch's object collectives
        # (all_gather_object) put their tensors on the *current* device, which is cuda:0 on every rank otherwise.
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", "0"))))


def resolve_path(name_or_path: str, key: str, revision: str | None = None) -> Path:
    """A local checkpoint folder for ``name_or_path``: a folder, a Hub ID (fetched into the HF cache), or an
    embedded model (built on first use). Rank 0 (then each node's local rank 0) resolves first; the other ranks
    wait and read what it fetched or built."""
    from aligner.distributed.lockstep import leaders_first

    return leaders_first(lambda: _resolve(name_or_path, key, revision))


def _resolve(name_or_path: str, key: str, revision: str | None) -> Path:
    if embedded.is_embedded(name_or_path):
        try:
            return embedded.ensure_embedded_model(name_or_path)
        except ValueError as exc:
            raise ModelError(f"{key}: {exc}") from None
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{key}: {name_or_path} is not a model folder (no config.json there). Give a Hugging "
                             f"Face checkpoint folder (written by save_pretrained), a Hub model ID, or embedded:tiny-sort")
        return path
    if hub.is_hub_id(name_or_path):
        return hub.snapshot(name_or_path, key, revision)
    raise ModelError(f"{key}: {name_or_path} is not a model folder (no config.json there) nor a Hub model ID "
                     f"(org/name); give a local checkpoint folder, a Hub ID such as meta-llama/Meta-Llama-3-8B-Instruct, "
                     f"or embedded:tiny-sort")


def chat_template_text(value: str) -> str:
    """``model.chat_template``: the path of a file holding a Jinja template, or the template itself."""
    if "{" not in value and "\n" not in value:
        path = Path(value)
        if not path.is_file():
            raise ModelError(f"model.chat_template: {value} is neither a file nor a Jinja template (no '{{' in it); "
                             f"give the template text or the path of a .jinja file")
        return path.read_text()
    return value


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_tokenizer(path: Path, trust_remote_code: bool = False, chat_template: str | None = None,
                   key: str = "model.name_or_path"):
    """The tokenizer at ``path`` (a resolved folder), with ``chat_template`` (text or file) in place of its own."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"{key}: {path} has no usable tokenizer ({exc}); save the tokenizer beside the model "
            f"with tokenizer.save_pretrained, or name another with model.tokenizer"
        ) from None
    if chat_template is not None:
        tokenizer.chat_template = chat_template_text(chat_template)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # as TRL does; padding is masked out anyway
    return tokenizer


def run_tokenizer(cfg: RunConfig, policy_path: Path):
    """The run's tokenizer: ``model.tokenizer`` (Hub ID or folder) or the policy's, with ``model.chat_template``."""
    m = cfg.model
    path = resolve_path(m.tokenizer, "model.tokenizer", m.revision) if m.tokenizer else policy_path
    return load_tokenizer(path, m.trust_remote_code, m.chat_template, "model.tokenizer" if m.tokenizer else "model.name_or_path")


def load_model(path: Path, cfg: RunConfig, dtype: str | None = None):
    """``AutoModelForCausalLM.from_pretrained`` in ``dtype`` (default ``model.dtype``, resolved by
    aligner/scoring/batch_path.py); under ZeRO-3 the weights are partitioned while loading.

    A model whose weights' dtype the run's attention kernel does not take (the fp32 reference a trust-region
    plugin moves, in a bf16 run on flash kernels) runs its forward under autocast to ``model.dtype``: its shards
    stay fp32 for exact mixing, its matmuls and attention run as the policy's do.
    """
    from transformers import AutoModelForCausalLM

    attn = attention.attn_implementation(cfg.model.attn_implementation, cfg.train.packing)
    weights = torch_dtype(dtype or cfg.model.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=weights, attn_implementation=attn,
                                                 trust_remote_code=cfg.model.trust_remote_code, use_safetensors=None)
    model.config.use_cache = False
    run_dtype = torch_dtype(cfg.model.dtype)
    if weights != run_dtype and not attention.takes(attn, weights):
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        model.forward = torch.autocast(device_type, dtype=run_dtype)(model.forward)
    return model


def host_adam_problem() -> str | None:
    """Why DeepSpeed's CPU Adam (the ``cpu_adam`` C++ op, built on first use and cached in
    ``TORCH_EXTENSIONS_DIR``) cannot step an offloaded optimizer here, or None when it loads."""
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        builder = CPUAdamBuilder()
        if not builder.is_compatible(verbose=False):
            return "DeepSpeed's cpu_adam op is not compatible with this machine"
        builder.load(verbose=False)
    except Exception as exc:  # noqa: BLE001 - a compiler missing, a build error: fall back, with the reason
        text = str(exc).strip().splitlines()
        return f"DeepSpeed's cpu_adam op does not build: {type(exc).__name__}: {text[0][:200] if text else ''}"
    return None


def deepspeed_config(cfg: RunConfig, cpu_adam: bool = False) -> dict[str, Any]:
    """The policy's DeepSpeed config, generated from ``train.*`` then overridden by ``train.deepspeed_config``.

    :param cpu_adam: with ``train.offload_optimizer``, step the host optimizer with DeepSpeed's vectorised
        ``DeepSpeedCPUAdam`` (:func:`host_adam_problem` says whether it loads) instead of ``torch.optim.AdamW``,
        which is about 10x slower on the host (benchmarks/RESULTS.md, optimizer step).
    """
    t = cfg.train
    host_adam = cpu_adam and t.offload_optimizer
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.max_grad_norm,
        # torch_adam: torch.optim.AdamW, no JIT-compiled fused Adam (PLATFORM.md: identical losses); offloaded,
        # DeepSpeedCPUAdam where its op builds.
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                   "weight_decay": t.weight_decay, "torch_adam": not host_adam}},
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": host_adam,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.deepspeed_config:
        path = Path(t.deepspeed_config)
        try:
            user = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"train.deepspeed_config: cannot read {path} as JSON: {exc}") from None
        conf = _merge(conf, user)
    return conf


def frozen_deepspeed_config(policy_conf: dict[str, Any], fp32: bool = False) -> dict[str, Any]:
    """Config for a model that only runs forward (reference, anchor): no optimizer, no offload of state.

    ``fp32=True`` for a reference that a trust-region plugin moves: its weights must stay fp32 whatever the
    policy's dtype, or small mixing weights are lost to bf16 rounding (``aligner/reference/trust_region.py``).
    """
    stage = policy_conf["zero_optimization"]["stage"]
    zero: dict[str, Any] = {"stage": 3 if stage == 3 else 0}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # no un-partitioned copies to go stale
        if "offload_param" in policy_conf["zero_optimization"]:
            zero["offload_param"] = policy_conf["zero_optimization"]["offload_param"]
    return {
        "train_micro_batch_size_per_gpu": policy_conf["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": policy_conf["gradient_accumulation_steps"],
        "zero_optimization": zero,
        "bf16": {"enabled": False} if fp32 else copy.deepcopy(policy_conf.get("bf16", {"enabled": False})),
        "steps_per_print": 10**9,
    }


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def lr_lambda(cfg: RunConfig):
    """Linear warm-up over ``train.warmup_steps``, then linear/cosine decay to 0 or constant."""
    warmup, total, kind = cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.lr_schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_policy_engine(path: Path, cfg: RunConfig, ds_conf: dict[str, Any], reference_adapter: bool = False,
                        mpu: Any = None):
    """The policy's training engine; under ``model.lora`` a ``PeftModel`` whose adapters alone train
    (``reference_adapter``: with the frozen adapter of a moved reference, aligner/models/lora.py). ``mpu``: DeepSpeed's
    sequence-parallel groups (aligner/scoring/sequence_parallel.py), or None."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    hf_ds = HfDeepSpeedConfig(ds_conf)  # noqa: F841 - must live while from_pretrained runs (ZeRO-3 init)
    model = load_model(path, cfg)
    if cfg.model.lora is not None:
        from aligner.models import lora

        model = lora.wrap(model, cfg.model.lora, cfg.train.seed, reference_adapter)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_conf,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
        mpu=mpu,
    )
    return engine


def build_frozen_engine(path: Path, cfg: RunConfig, ds_conf: dict[str, Any], fp32: bool = False, mpu: Any = None):
    """A ZeRO inference engine for the reference or the anchor (no optimizer, no gradients).

    ``fp32=True`` loads the weights in fp32 (pair it with ``frozen_deepspeed_config(..., fp32=True)``);
    ``mpu`` as for :func:`build_policy_engine`.
    """
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    hf_ds = HfDeepSpeedConfig(ds_conf)  # noqa: F841
    model = load_model(path, cfg, "float32" if fp32 else None)
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds_conf, mpu=mpu)
    engine.eval()
    return engine
