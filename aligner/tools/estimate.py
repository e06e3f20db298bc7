"""``aligner-estimate``: per-rank memory of a run before it is launched.

It reads the same YAML (and ``--plugins``, ``--set``) as ``aligner-train``,
activates the plugins and asks them which models they need
(``aligner_required_models``), so it counts only the engines the run will
build. Model shapes come from the checkpoint's ``config.json``
(``model.name_or_path``: a folder, or a Hub ID whose ``config.json`` is in the
HF cache, else the built-in shape known for that ID), or from
``--model-config`` (a ``config.json`` or a built-in shape such as
``llama3-8b``), so nothing is downloaded.

Per rank, with P parameters, N = gpus x nodes ranks, d = bytes of the model
dtype (2 for bf16, 4 for fp32), ZeRO-3:

- policy training state: lp params d·P/N, lp gradient partitions d·P/N, fp32
  master 4·P/N, Adam moments 8·P/N, and the fp32 gradient copy DeepSpeed
  flattens for the optimizer step 4·P/N (``_prepare_fp32_grad_for_sub_group``: created per sub-group at each
  step and released after it, as the buffer ``initialize_optimizer_states`` allocates at setup is; with bf16
  weights the flattened bf16 copy it is converted from lives beside it, d·min(P/N, sub_group_size)).
  ``train.offload_optimizer`` moves master, moments and fp32 gradients to host
  memory. Params under ``stage3_param_persistence_threshold`` stay whole on
  every rank.
- ZeRO-3 working buffers: the gradient reduce bucket (``reduce_bucket_size``
  elements of the model dtype), its concatenated copy for the reduce-scatter
  during backward (on CPU with several ranks also gloo's temporary copies,
  1.5x the bucket, measured), and the gathered (un-partitioned) parameters,
  at most ``stage3_max_live_parameters`` (+ the prefetch bucket) at a time.
- each frozen engine (reference, anchor): d_f·P/N (no persistent params),
  and its gathered parameters while it runs. A reference that a
  reference-update plugin moves is fp32.
- activations for one micro-batch of 2·B sequences (chosen + rejected) of
  ``data.max_length`` tokens, per layer and token (tensors autograd keeps for
  a Llama block with SDPA attention): 10·h + 3·kv + 4·I elements (h hidden,
  kv = key/value width, I the MLP width), plus H·L² score and probability
  elements per sequence for eager attention. With gradient checkpointing: h
  per layer and token plus one layer's full set while it is recomputed.
- ``train.sequence_parallel: N`` (aligner/scoring/sequence_parallel.py): every rank holds 1/N of the row's tokens, so
  the activations, the logits and every frozen or evaluation forward count T/N tokens; per layer and token
  each rank also keeps what DeepSpeed's two all-to-alls return for backward: the gathered q/k/v of its heads
  and the attention output before it is sent back (2·h + 2·kv elements). The ZeRO-3 shards still split over
  all ranks.
- logits: T·V in the model dtype, and, for the scored tokens, the picked rows
  (d) and their fp32 copy (4) that ``aligner/scoring/logps.py`` keeps for backward.
  An evaluation forward (``eval.batch_size`` pairs, no gradients) holds its
  logits and picked rows; the peak is the larger of the training
  forward/backward, the optimizer step and the evaluation forward.
- a constant per-process overhead (framework, CUDA context or the Python
  process), stated in the output.

These are the sizes the code allocates; fragmentation beyond the stated
overhead is not modelled.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aligner.models import hub
from aligner.models.plan import POLICY_INITIAL, ModelPlan, make_plan

GIB = 2**30

#: Per-process overhead not tied to the model, by accelerator. CPU: Python with torch, transformers, deepspeed and
#: datasets imported, gloo up, the tokenized data; fitted on the two smallest runs of benchmarks/scale_cpu.py (4.6M
#: and 20M parameters, 2 ranks, dpo: measured peak RSS minus the model terms, 0.61 and 0.67 GiB). GPU: the CUDA
#: context, NCCL buffers and caching-allocator slack: an assumption, not measured (benchmarks/scale_8b.sh prints
#: the measured peak beside the estimate).
OVERHEAD_GIB = {"cpu": 0.65, "gpu": 2.0}

#: Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json), so no download is needed.
BUILTIN_SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "tie_word_embeddings": False, "max_position_embeddings": 8192,
    },
}

#: Hub IDs whose shape is built in, so that an estimate needs neither network nor cache.
#: Llama-3.1-8B has Llama-3-8B's shapes (only its RoPE scaling and context length differ, which memory does not read).
HUB_SHAPES = {"meta-llama/Meta-Llama-3-8B-Instruct": "llama3-8b", "meta-llama/Meta-Llama-3-8B": "llama3-8b",
              "meta-llama/Llama-3.1-8B-Instruct": "llama3-8b", "meta-llama/Llama-3.1-8B": "llama3-8b"}

# DeepSpeed's ZeRO defaults (deepspeed/runtime/zero/config.py), used when the DeepSpeed config leaves them unset.
DS_DEFAULTS = {
    "reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7, "stage3_max_live_parameters": 1e9,
    "stage3_param_persistence_threshold": 1e5, "sub_group_size": 1e9,
}


class EstimateError(ValueError):
    """The estimator cannot work out a shape or a setting; the message names it and the fix."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-family decoder that memory depends on."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False

    @classmethod
    def from_dict(cls, conf: dict[str, Any], source: str) -> ModelShape:
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in keys if k not in conf]
        if missing:
            raise EstimateError(f"{source}: no {', '.join(missing)}; the estimator needs a Llama-family config.json "
                                f"(pass --model-config with one, or --model-config llama3-8b)")
        heads = int(conf["num_attention_heads"])
        return cls(
            vocab_size=int(conf["vocab_size"]), hidden_size=int(conf["hidden_size"]),
            intermediate_size=int(conf["intermediate_size"]), num_layers=int(conf["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(conf.get("num_key_value_heads") or heads),
            head_dim=int(conf.get("head_dim") or conf["hidden_size"] // heads),
            tie_word_embeddings=bool(conf.get("tie_word_embeddings", False)),
            attention_bias=bool(conf.get("attention_bias", False)),
        )

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_params(self) -> int:
        h, q, kv, i = self.hidden_size, self.num_heads * self.head_dim, self.kv_width, self.intermediate_size
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.attention_bias else 0)
        return attn + 3 * h * i + 2 * h  # + two RMSNorm weights

    def num_params(self) -> int:
        embed = self.vocab_size * self.hidden_size
        return embed * (1 if self.tie_word_embeddings else 2) + self.num_layers * self.layer_params() + self.hidden_size

    def largest_layer_params(self) -> int:
        """Parameters of the largest single module, as DeepSpeed's ``model_to_params`` counts them."""
        h, q = self.hidden_size, self.num_heads * self.head_dim
        return max(self.vocab_size * h, h * self.intermediate_size, h * q)

    def persistent_params(self, threshold: float) -> int:
        """Parameters under ZeRO-3's persistence threshold (kept whole on every rank): the norm weights, and
        any other tensor smaller than the threshold."""
        h, q, kv, i = self.hidden_size, self.num_heads * self.head_dim, self.kv_width, self.intermediate_size
        per_layer = [h, h, h * q, h * kv, h * kv, q * h, h * i, h * i, h * i]
        if self.attention_bias:
            per_layer += [q, kv, kv]
        small = sum(n for n in per_layer if n < threshold) * self.num_layers
        small += h if h < threshold else 0
        embed = self.vocab_size * h
        small += (embed if embed < threshold else 0) * (1 if self.tie_word_embeddings else 2)
        return small

    def lora_params(self, target_modules: str | list[str], rank: int) -> int:
        """Elements of rank-``rank`` adapters on the targeted linear layers: r·(in + out) per adapted layer
        (``all-linear``: all seven of a Llama block; names of other modules count nothing here)."""
        h, q, kv, i = self.hidden_size, self.num_heads * self.head_dim, self.kv_width, self.intermediate_size
        shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                  "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        names = shapes if isinstance(target_modules, str) else [n for n in target_modules if n in shapes]
        return self.num_layers * sum(rank * sum(shapes[n]) for n in names)

    def activation_elems_per_token_layer(self) -> int:
        """Elements autograd keeps per token and layer of a Llama block (SDPA attention): see the module doc."""
        return 10 * self.hidden_size + 3 * self.kv_width + 4 * self.intermediate_size


def load_shape(model_config: str | None, name_or_path: str) -> tuple[ModelShape, str]:
    """The model's shape from ``--model-config`` (a file, a folder or a built-in name) or the checkpoint folder."""
    conf, source = load_model_config(model_config, name_or_path)
    return ModelShape.from_dict(conf, source), source


def load_model_config(model_config: str | None, name_or_path: str) -> tuple[dict[str, Any], str]:
    """The model's config.json as a dict (its ``text_config`` for a multimodal one) and where it came from:
    ``--model-config`` (a file, a folder or a built-in name), else the checkpoint (folder, Hub cache, built-in
    shape of a known Hub ID)."""
    spec = model_config or name_or_path
    if spec in BUILTIN_SHAPES:
        return BUILTIN_SHAPES[spec], f"built-in shape {spec}"
    if model_config is None and spec.startswith("embedded:"):
        from aligner.data import embedded

        path = embedded.embedded_dir(spec) / "config.json"
        if not path.is_file():
            from aligner.models.loading import resolve_path

            path = resolve_path(spec, "model.name_or_path") / "config.json"
    elif model_config is None and not Path(spec).exists() and hub.is_hub_id(spec):
        path = hub.cached_file(spec, "config.json")
        if path is None and spec in HUB_SHAPES:
            return BUILTIN_SHAPES[HUB_SHAPES[spec]], f"built-in shape of {spec}"
        if path is None:
            raise EstimateError(
                f"model.name_or_path: the config.json of {spec} is not in the Hugging Face cache; fetch it "
                f"(`{hub.fetch_command(spec)} config.json`) or pass --model-config (a config.json, a folder, or "
                f"a built-in shape: {', '.join(BUILTIN_SHAPES)})"
            )
    else:
        path = Path(spec)
        path = path / "config.json" if path.is_dir() else path
    key = "--model-config" if model_config else "model.name_or_path"
    if not path.is_file():
        raise EstimateError(
            f"{key}: {spec} has no config.json; give a checkpoint folder, a config.json, or a built-in shape "
            f"({', '.join(BUILTIN_SHAPES)}) with --model-config"
        )
    try:
        conf = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EstimateError(f"{key}: {path} is not valid JSON: {exc}") from None
    return conf.get("text_config", conf), str(path)


@dataclass(frozen=True)
class FrozenModel:
    """A model beside the policy that the run will hold, one per engine or cache: which (``reference+anchor`` for
    one shared by both), from where, in which dtype, and whether the static log-prob cache replaces its engine
    after a pre-pass. A view of the run's :class:`aligner.models.plan.ModelPlan`."""

    role: str  # "reference", "anchor" or "reference+anchor" (one shared engine or cache)
    path: str
    dtype: str
    cached: bool


def data_is_paired(cfg) -> bool | None:
    """Whether ``data.train`` holds preference pairs, from its columns; None when it cannot be read here
    (the estimate then assumes pairs, and says so)."""
    from aligner.data import DataError
    from aligner.data.formats import detect_paired
    from aligner.data.prepare import load_source, sources

    d = cfg.data
    try:
        first = sources(d.train, d.train_split, d.subset, d.columns, "data.train")[0]
        return detect_paired(list(load_source(first, cfg.train.seed).column_names), f"data.train ({first.label})")
    except DataError:
        return None


def planned_frozen_models(cfg, plugins, plan: ModelPlan | None = None) -> list[FrozenModel]:
    """The frozen engines and caches of the run's plan (:func:`aligner.models.plan.make_plan`, the rules training uses)."""
    plan = plan or make_plan(cfg, plugins)
    out: dict[str, FrozenModel] = {}
    for spec in plan.frozen():
        if spec.shares == "policy" or (spec.shares and spec.shares not in out):
            continue  # LoRA: the policy engine with its adapters off or switched holds no weights of its own
        if spec.shares:
            shared = out.pop(spec.shares)
            out[spec.shares] = FrozenModel(f"{shared.role}+{spec.name}", shared.path, shared.dtype, shared.cached)
            continue
        path = cfg.model.name_or_path if spec.source == POLICY_INITIAL else spec.source
        out[spec.name] = FrozenModel(spec.name, path, spec.dtype, spec.state == "cached")
    return list(out.values())


@dataclass
class Line:
    name: str
    bytes: float
    note: str = ""
    #: ``held`` for the whole loop; ``fwd`` only during forward+backward; ``step`` only in the optimizer step;
    #: ``eval`` only during an evaluation forward.
    phase: str = "held"


@dataclass
class Estimate:
    """Per-rank memory, line by line; ``steady`` is the training loop, ``prepass`` the static-cache pre-pass."""

    shape: ModelShape
    ranks: int
    gpus_per_node: int
    device: str
    overhead: float
    steady: list[Line] = field(default_factory=list)
    prepass: list[Line] = field(default_factory=list)
    host: list[Line] = field(default_factory=list)  # per rank, on the host (offloaded state)
    frozen: list[FrozenModel] = field(default_factory=list)
    plan: ModelPlan | None = None
    data_paired: bool | None = None  # None: data.train could not be read here, pairs assumed
    batch_path: Any = None  # aligner.scoring.batch_path.BatchPath: the path the run takes (aligner-estimate only)
    trainable: int = 0  # parameters the optimizer holds state for (under model.lora: the adapters)
    sequence_parallel: int = 1  # ranks per sequence (train.sequence_parallel)

    @property
    def steady_total(self) -> float:
        """Overhead + what is held + the larger of the forward/backward and optimizer-step transients."""
        phase = {p: sum(line.bytes for line in self.steady if line.phase == p) for p in ("held", "fwd", "step", "eval")}
        return self.overhead + phase["held"] + max(phase["fwd"], phase["step"], phase["eval"])

    @property
    def prepass_total(self) -> float:
        return self.overhead + sum(line.bytes for line in self.prepass) if self.prepass else 0.0

    @property
    def peak(self) -> float:
        return max(self.steady_total, self.prepass_total)

    @property
    def host_per_node(self) -> float:
        return sum(line.bytes for line in self.host) * self.gpus_per_node

    def model_states(self) -> dict[str, float]:
        """The policy's ZeRO-3 model states per rank, by kind (what DeepSpeed's own estimator counts)."""
        names = ("policy params", "policy fp32 gradients", "policy fp32 master", "policy Adam moments")
        return {line.name: line.bytes for line in [*self.steady, *self.host] if line.name in names}


def _bytes(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def _zero_setting(zero: dict[str, Any], key: str) -> float:
    value = zero.get(key, zero.get(key.replace("stage3_", ""), DS_DEFAULTS[key]))
    if value == "auto":
        raise EstimateError(f"DeepSpeed config: zero_optimization.{key} is 'auto'; give a number (the estimator "
                            f"does not know what the HF Trainer would fill in)")
    return float(value)


def gradient_checkpointing(cfg) -> bool:
    return bool(getattr(cfg.train, "gradient_checkpointing", False) or getattr(cfg.model, "gradient_checkpointing", False))


def estimate(cfg, plugins, shape: ModelShape, gpus_per_node: int = 1, nodes: int = 1, device: str = "gpu",
             frozen_shapes: dict[str, ModelShape] | None = None, plan: ModelPlan | None = None) -> Estimate:
    """Per-rank memory of ``cfg`` with these plugins on ``gpus_per_node`` x ``nodes`` ranks.

    :param device: ``gpu`` (buffers count in full once allocated) or ``cpu`` (a buffer's pages count only once
        written, as resident memory does: the reduce bucket fills up to the number of gradient elements).
    :param frozen_shapes: shapes of frozen models loaded from other checkpoints, by path (default: the policy's).
    :param plan: the run's model plan (default: :func:`aligner.models.plan.make_plan` on paired data).
    """
    from aligner.models import loading

    if gpus_per_node < 1 or nodes < 1:
        raise EstimateError(f"--gpus and --nodes must be >= 1, got {gpus_per_node} and {nodes}")
    cfg = resolved(cfg, device)
    ranks = gpus_per_node * nodes
    from aligner.scoring.sequence_parallel import check_config, head_problem

    check_config(cfg, ranks)  # what the run would refuse, refused here too
    problem = head_problem(cfg.train.sequence_parallel, shape.num_heads, shape.num_kv_heads)
    if cfg.train.sequence_parallel > 1 and problem:
        raise EstimateError(f"train.sequence_parallel={cfg.train.sequence_parallel}: {problem}")
    zero = loading.deepspeed_config(cfg).get("zero_optimization", {})
    est = Estimate(shape, ranks, gpus_per_node, device, OVERHEAD_GIB[device] * GIB,
                   sequence_parallel=cfg.train.sequence_parallel)
    est.plan = plan or make_plan(cfg, plugins)
    est.frozen = planned_frozen_models(cfg, plugins, est.plan)
    est.trainable = trainable_params(est, cfg)
    _policy_state(est, cfg, zero)
    _zero_buffers(est, cfg, zero)
    _policy_forward(est, cfg)
    _frozen_models(est, cfg, zero, frozen_shapes or {})
    return est


def resolved(cfg, device: str):
    """``cfg`` with ``model.dtype: auto`` resolved as a run on ``device`` resolves it (aligner/scoring/batch_path.py)."""
    import dataclasses

    from aligner.scoring.batch_path import resolve_dtype

    dtype = resolve_dtype(cfg.model.dtype, cuda=device == "gpu")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=dtype))


def _shards(zero: dict[str, Any], ranks: int) -> tuple[int, int, int]:
    """How many ways params, gradients and optimizer state are split at this ZeRO stage."""
    return {0: (1, 1, 1), 1: (1, 1, ranks), 2: (1, ranks, ranks), 3: (ranks, ranks, ranks)}[int(zero.get("stage", 0))]


def _offloaded(zero: dict[str, Any], key: str) -> bool:
    return key in zero and zero[key].get("device", "none") != "none"


def trainable_params(est: Estimate, cfg) -> int:
    """Parameters the optimizer holds state for: all of them, or under ``model.lora`` the adapters only."""
    lora = cfg.model.lora
    return est.shape.num_params() if lora is None else est.shape.lora_params(lora.target_modules, lora.r)


def _policy_state(est: Estimate, cfg, zero: dict[str, Any]) -> None:
    """The policy's params, gradient partitions, fp32 master, fp32 gradients and Adam moments (of the trainable
    parameters: under ``model.lora`` the adapters, and the frozen reference adapter when a plugin moves it)."""
    d, P, stage, shard = _bytes(cfg.model.dtype), est.shape.num_params(), int(zero.get("stage", 0)), _shards(zero, est.ranks)
    T = trainable_params(est, cfg)
    where = est.host if _offloaded(zero, "offload_optimizer") else est.steady
    persistent = est.shape.persistent_params(_zero_setting(zero, "stage3_param_persistence_threshold")) if stage == 3 else 0
    params_line = Line("policy params", d * ((P - persistent) / shard[0] + persistent),
                       f"{cfg.model.dtype}, 1/{shard[0]} of {P / 1e9:.3f}B" + (f" + {persistent:,} persistent" if persistent else ""))
    (est.host if _offloaded(zero, "offload_param") else est.steady).append(params_line)
    if cfg.model.lora is not None:
        moved = any(spec.adapters == "reference" for spec in est.plan.frozen())
        R = cfg.model.lora.ref_rank if moved else 0
        A = T + est.shape.lora_params(cfg.model.lora.target_modules, R)
        est.steady.append(Line("LoRA adapters", d * A / shard[0], f"{T:,} trainable (r={cfg.model.lora.r})"
                               + (f" + {A - T:,} reference adapter (rank {R})" if moved else "") + f", 1/{shard[0]}"))
    est.steady.append(Line("policy gradient partitions", d * T / shard[1], f"{cfg.model.dtype}, 1/{shard[1]}"))
    where.append(Line("policy fp32 gradients", 4 * T / shard[2], "flattened for the optimizer step", "step"))
    if stage == 3 and not _offloaded(zero, "offload_optimizer") and d != 4:
        # stage3._prepare_fp32_grad_for_sub_group: flatten(averaged_gradients) (model dtype) then .to(fp32); the
        # flat copy lives beside the fp32 one until the sub-group's step (sub_group_size elements at most).
        group = min(T / shard[2], _zero_setting(zero, "sub_group_size"))
        est.steady.append(Line("policy flattened gradients", d * group, f"{cfg.model.dtype} copy beside the fp32 one, "
                               f"{int(group):,} elements (one sub-group)", "step"))
    where.append(Line("policy fp32 master", 4 * T / shard[2], "fp32 copy of the partition"))
    where.append(Line("policy Adam moments", 8 * T / shard[2], "exp_avg + exp_avg_sq, fp32"))


def _zero_buffers(est: Estimate, cfg, zero: dict[str, Any]) -> None:
    """ZeRO's working buffers: the reduce bucket, its reduce-scatter copies, the gathered parameters."""
    d, P, stage = _bytes(cfg.model.dtype), trainable_params(est, cfg), int(zero.get("stage", 0))
    if stage == 3:
        bucket = _zero_setting(zero, "reduce_bucket_size")
        cpu = est.device == "cpu"
        touched = min(bucket, P) if cpu else bucket
        est.steady.append(Line("reduce bucket", d * touched, f"{int(bucket):,} elements" + (" (pages written)" if cpu else "")))
        # reduce_scatter_coalesced (deepspeed/runtime/comm/coalesced_collectives.py) concatenates the bucket's
        # padded partitions into one new buffer before the collective: a second copy of a full bucket.
        est.steady.append(Line("reduce-scatter staging", d * min(bucket, P), "torch.cat of the bucket's partitions", "fwd"))
        if cpu and est.ranks > 1:
            # Gloo's reduce_scatter_tensor works on temporary copies: 1.5x its input, measured (95 MiB in, 145 MiB
            # more peak RSS on 2 ranks, torch 2.13). NCCL reduces in place.
            est.steady.append(Line("gloo reduce-scatter scratch", 1.5 * d * min(bucket, P), "gloo's temporary copies", "fwd"))
        live = min(est.shape.num_params(), _zero_setting(zero, "stage3_max_live_parameters") + _zero_setting(zero, "stage3_prefetch_bucket_size"))
        est.steady.append(Line("policy gathered params", d * live, f"{int(live):,} live elements (max_live + prefetch)"))
    elif stage in (1, 2):
        est.steady.append(Line("reduce bucket", d * min(_zero_setting(zero, "reduce_bucket_size"), P), ""))


def head_bytes(tokens: int, shape: ModelShape, d: int, chunk_tokens: int, grad: bool) -> tuple[float, str]:
    """Memory of the LM head's output for ``tokens`` scored tokens (aligner/scoring/logps.py), and a note.

    Naive (``train.logps_chunk_tokens`` 0): the (T, V) logits in the model dtype and the picked rows (d), plus,
    with gradients, their fp32 copy (4), or without, one fp32 conversion chunk of 1024 rows. Chunked (c > 0):
    one (c, V) fp32 logits buffer, with gradients also its model-dtype copy in the backward pass, and the
    (T, h) hidden states the chunks are computed from.
    """
    V = shape.vocab_size
    if chunk_tokens:
        c = min(chunk_tokens, tokens)
        return c * V * (4 + (d if grad else 0)) + tokens * shape.hidden_size * d, f"chunked: {c} x {V} fp32 at a time"
    if grad:
        return tokens * V * (2 * d + 4), f"{tokens} x {V} (logits + picked rows + fp32 copy)"
    return tokens * 2 * V * d + min(tokens, 1024) * V * 4, f"{tokens} x {V} (logits + picked rows)"


def _policy_forward(est: Estimate, cfg) -> None:
    """Activations of the policy's forward+backward at the configured lengths, its logits, the eval forward."""
    from aligner.models import attention

    shape, d, chunk = est.shape, _bytes(cfg.model.dtype), cfg.train.logps_chunk_tokens
    B, L, sp = cfg.train.micro_batch_size, cfg.data.max_length, cfg.train.sequence_parallel
    T = sp_tokens(2 * B * L, sp)  # chosen + rejected, padded to max_length (the worst case); this rank's share
    elems = shape.activation_elems_per_token_layer() + (2 * shape.hidden_size + 2 * shape.kv_width if sp > 1 else 0)
    per_layer = elems * T * d
    attn = attention.attn_implementation(cfg.model.attn_implementation, cfg.train.packing)
    if attn == "eager":
        per_layer += 2 * shape.num_heads * L * L * 2 * B * d  # scores + probabilities
    if gradient_checkpointing(cfg):
        act = shape.num_layers * T * shape.hidden_size * d + per_layer
        act_note = f"gradient checkpointing: {T} tokens x h per layer + one layer recomputed"
    else:
        act = shape.num_layers * per_layer
        act_note = f"{T} tokens x {shape.num_layers} layers, {attn} attention" + (
            f", 1/{sp} of the row per rank (sequence parallel, all-to-all outputs kept)" if sp > 1 else "")
    est.steady.append(Line("policy activations", act, act_note, "fwd"))
    logits, note = head_bytes(T, shape, d, chunk, grad=True)
    est.steady.append(Line("policy logits", logits, f"{cfg.model.dtype}, {note}", "fwd"))
    if cfg.data.eval:
        eval_T = sp_tokens(2 * cfg.eval.batch_size * L, sp)
        est.steady.append(Line("eval forward (transient)", _frozen_forward(eval_T, shape, d, chunk),
                               f"{eval_T} tokens at eval.batch_size, no gradients", "eval"))


def sp_tokens(tokens: int, sp: int) -> int:
    """One rank's share of a row of ``tokens`` under ``train.sequence_parallel: sp`` (padded to a multiple)."""
    return -(-tokens // sp)


def _frozen_forward(tokens: int, shape: ModelShape, d: int, chunk_tokens: int) -> float:
    """A no-grad forward over ``tokens`` tokens: its head output and one layer's MLP."""
    return head_bytes(tokens, shape, d, chunk_tokens, grad=False)[0] + tokens * 3 * shape.intermediate_size * d


def _frozen_models(est: Estimate, cfg, zero: dict[str, Any], frozen_shapes: dict[str, ModelShape]) -> None:
    """Each frozen engine's partitions and gathered params; a cached one counts in the pre-pass instead."""
    stage, shard, chunk = int(zero.get("stage", 0)), _shards(zero, est.ranks), cfg.train.logps_chunk_tokens
    gathered_limit = _zero_setting(zero, "stage3_max_live_parameters") + _zero_setting(zero, "stage3_prefetch_bucket_size")
    prepass: dict[str, list[Line]] = {}
    for fm in est.frozen:
        fshape = frozen_shapes.get(fm.path, est.shape)
        fP, fd = fshape.num_params(), _bytes(fm.dtype)
        lines = [Line(f"{fm.role} params", fd * fP / shard[0], f"{fm.dtype}, 1/{shard[0]}, no persistent params"),
                 Line(f"{fm.role} gathered params", fd * min(fP, gathered_limit) if stage == 3 else 0.0, "while it runs")]
        if fm.cached:
            eval_T = sp_tokens(2 * cfg.eval.batch_size * cfg.data.max_length, cfg.train.sequence_parallel)
            lines.append(Line(f"{fm.role} forward (pre-pass)", _frozen_forward(eval_T, fshape, fd, chunk),
                              f"{eval_T} tokens at eval.batch_size"))
            prepass[fm.role] = lines
            est.steady.append(Line(f"{fm.role} log-prob cache", 0.0, "cached: engine dropped after the pre-pass"))
        else:
            est.steady += lines
    non_cached = [fm for fm in est.frozen if not fm.cached]
    if non_cached:
        # Runs after the policy's forward, whose activations are alive: one transient layer and its logits.
        fshape = frozen_shapes.get(non_cached[0].path, est.shape)
        T = sp_tokens(2 * cfg.train.micro_batch_size * cfg.data.max_length, cfg.train.sequence_parallel)
        fd = max(_bytes(fm.dtype) for fm in non_cached)
        est.steady.append(Line("frozen forward (transient)", _frozen_forward(T, fshape, fd, chunk),
                               f"{T} tokens: logits, picked rows, one layer's MLP", "fwd"))
    if prepass:
        # The pre-pass runs before the policy is built: only the overhead and the frozen engines (one at a time,
        # so the largest counts).
        est.prepass = max(prepass.values(), key=lambda lines: sum(line.bytes for line in lines))


def deepspeed_model_states(total_params: int, largest_layer_params: int, gpus_per_node: int, nodes: int,
                           offload_optimizer: bool) -> tuple[float, float]:
    """DeepSpeed's own ZeRO-3 model-state estimate (cpu bytes per node, gpu bytes per GPU), ``zero_init=True``."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        total_params, largest_layer_params, num_gpus_per_node=gpus_per_node, num_nodes=nodes,
        cpu_offload=offload_optimizer, cpu_offload_params=False, zero_init=True)
    return float(cpu), float(gpu)


def format_estimate(est: Estimate, gpu_mem_gib: float) -> str:
    s = est.shape
    out = [f"model: {s.num_params() / 1e9:.3f}B params ({s.num_layers} layers, hidden {s.hidden_size}, "
           f"vocab {s.vocab_size}); {est.ranks} ranks ({est.gpus_per_node} per node), device {est.device}"
           + (f"; sequence parallel: {est.sequence_parallel} ranks per sequence, {est.ranks // est.sequence_parallel} "
              f"data-parallel group{'s' if est.ranks > est.sequence_parallel else ''}" if est.sequence_parallel > 1 else "")
           + (f"; LoRA: {est.trainable:,} trainable params" if est.trainable != s.num_params() else "")]
    frozen = ", ".join(f"{f.role} ({f.dtype}{', cached' if f.cached else ''})" for f in est.frozen) or "none"
    out.append(f"frozen models the plugins build: {frozen}")
    if est.plan is not None:
        assumed = " (data.train not readable here: preference pairs assumed)" if est.data_paired is None else ""
        out.append(f"model plan: {est.plan.describe()}{assumed}")
    if est.batch_path is not None:
        out.append(f"batch path: {est.batch_path.describe()}")
    out.append("")
    out.append(f"{'per rank, training':<34} {'GiB':>9}  note")
    for line in est.steady:
        tag = {"held": "", "fwd": " [fwd/bwd]", "step": " [optimizer step]", "eval": " [eval]"}[line.phase]
        out.append(f"  {line.name:<32} {line.bytes / GIB:9.3f}  {line.note}{tag}")
    out.append(f"  {'per-process overhead':<32} {est.overhead / GIB:9.3f}  constant (aligner.tools.estimate.OVERHEAD_GIB['{est.device}'])")
    out.append(f"  {'total':<32} {est.steady_total / GIB:9.3f}  held + max([fwd/bwd], [optimizer step], [eval])")
    if est.prepass:
        out.append(f"{'per rank, static-cache pre-pass':<34}")
        for line in est.prepass:
            out.append(f"  {line.name:<32} {line.bytes / GIB:9.3f}  {line.note}")
        out.append(f"  {'total (with overhead)':<32} {est.prepass_total / GIB:9.3f}")
    if est.host:
        out.append(f"{'host memory (offloaded), per rank':<34}")
        for line in est.host:
            out.append(f"  {line.name:<32} {line.bytes / GIB:9.3f}  {line.note}")
        out.append(f"  host per node ({est.gpus_per_node} ranks): {est.host_per_node / GIB:.2f} GiB")
    fits = est.peak <= gpu_mem_gib * GIB
    out.append("")
    out.append(f"peak per rank: {est.peak / GIB:.2f} GiB of {gpu_mem_gib:g} GiB -> "
               + ("fits" if fits else f"does NOT fit (short by {(est.peak - gpu_mem_gib * GIB) / GIB:.2f} GiB)"))
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="aligner-estimate", description="Per-rank memory of an aligner run, before launching it.")
    p.add_argument("--config", required=True, help="the run's YAML config")
    p.add_argument("--plugins", help="comma-separated plugin names (as for aligner-train)")
    p.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (ranks) per node (default 1)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    p.add_argument("--model-config", help=f"a config.json, a checkpoint folder or a built-in shape ({', '.join(BUILTIN_SHAPES)})")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu", help="where the ranks run (cpu: ranks on CPU, as in CI)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    args = p.parse_args(argv)
    if not args.gpu_mem_gib > 0 or args.gpu_mem_gib == float("inf"):
        p.error(f"--gpu-mem-gib must be a GPU's memory in GiB, a number > 0 (e.g. 80), got {args.gpu_mem_gib:g}")
    return args


def run_estimate(args: argparse.Namespace) -> Estimate:
    from aligner.recipes.train import configure

    ns = argparse.Namespace(config=args.config, plugins=args.plugins, overrides=args.overrides)
    if not Path(args.config).is_file():
        raise EstimateError(f"--config {args.config}: no such file; pass the path of the run's YAML config (see configs/)")
    cfg, plugins = configure(ns)
    cfg = resolved(cfg, args.device)
    conf, source = load_model_config(args.model_config, cfg.model.name_or_path)
    shape = ModelShape.from_dict(conf, source)
    paired = data_is_paired(cfg)
    plan = make_plan(cfg, plugins, paired_data=paired is not False)
    path = batch_path(cfg, conf, paired is not False, plan.needs("kl_pairs"), args.device)
    cfg = path.configured(cfg)  # the memory of the path the run takes, fallbacks included
    frozen_shapes = {}
    for fm in planned_frozen_models(cfg, plugins, plan):
        if fm.path != cfg.model.name_or_path and args.model_config is None:
            frozen_shapes[fm.path] = load_shape(None, fm.path)[0]
    est = estimate(cfg, plugins, shape, args.gpus, args.nodes, args.device, frozen_shapes, plan)
    est.data_paired, est.batch_path = paired, path
    return est


def batch_path(cfg, conf: dict[str, Any], paired: bool, kl_pairs: bool, device: str):
    """The run's :class:`aligner.scoring.batch_path.BatchPath` as the run decides it (the model's config ``conf``, the data,
    the plugins' inputs), on ``device``; a GPU kernel is left to the run's start-up self-check."""
    from transformers import AutoConfig, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from aligner.scoring.batch_path import decide

    if conf.get("model_type") in CONFIG_MAPPING_NAMES:
        model_config = AutoConfig.for_model(**conf)
    else:  # a bare shape (--model-config without a model_type transformers knows): the fields it has decide
        model_config = PretrainedConfig(**conf)
    return decide(cfg, model_config, paired, kl_pairs, cuda=device == "gpu", pick_kernel=False)


def to_json(est: Estimate, gpu_mem_gib: float) -> dict[str, Any]:
    return {
        "params": est.shape.num_params(), "trainable_params": est.trainable, "ranks": est.ranks, "device": est.device,
        "sequence_parallel": est.sequence_parallel,
        "frozen": [f.__dict__ for f in est.frozen],
        "plan": est.plan.to_dict() if est.plan is not None else None, "data_paired": est.data_paired,
        "batch_path": est.batch_path.to_dict() if est.batch_path is not None else None,
        "steady_gib": {line.name: line.bytes / GIB for line in est.steady},
        "prepass_gib": {line.name: line.bytes / GIB for line in est.prepass},
        "host_gib_per_rank": {line.name: line.bytes / GIB for line in est.host},
        "overhead_gib": est.overhead / GIB, "steady_total_gib": est.steady_total / GIB,
        "prepass_total_gib": est.prepass_total / GIB, "peak_gib": est.peak / GIB,
        "host_per_node_gib": est.host_per_node / GIB, "fits": est.peak <= gpu_mem_gib * GIB,
    }


def main(argv: list[str] | None = None) -> int:
    from aligner.config import ConfigError
    from aligner.models import ModelError
    from aligner.registry import PluginError, PluginHookError

    args = parse_args(argv)
    try:
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            est = run_estimate(args)  # libraries' log lines (DeepSpeed's go to stdout) stay out of the JSON
    except (EstimateError, ConfigError, PluginError, PluginHookError, ModelError) as exc:
        print(f"aligner-estimate: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(to_json(est, args.gpu_mem_gib), indent=2) if args.json else format_estimate(est, args.gpu_mem_gib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
