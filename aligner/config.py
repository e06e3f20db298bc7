"""Typed run configuration: a YAML file, then ``--set key=value`` overrides.

Every section is a dataclass whose defaults are the one source of truth for
that option. Unknown keys and values of the wrong type are errors that name
the key, where it came from, and what was expected. Each active plugin adds
its own section (see ``aligner_config_section``).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """The run config is wrong; the message names the key or file and the fix."""


#: ``model.lora.target_modules`` default: every linear layer of the decoder (peft's "all-linear": not the LM head).
ALL_LINEAR = "all-linear"


@dataclass
class LoraSection:
    """``model.lora``: train LoRA adapters (peft) instead of the full weights (aligner/models/lora.py)."""

    r: int = 8  #: the adapters' rank (>= 1)
    alpha: float = 16.0  #: LoRA's α (> 0): the update is (α/r)·B·A
    dropout: float = 0.0  #: dropout on the adapters' input, in [0, 1)
    #: ``all-linear`` (every linear layer of the decoder, not the LM head, as peft's "all-linear"), or a list of
    #: module names (suffixes such as ``q_proj``, as peft's ``target_modules``: ``[q_proj, v_proj]``).
    target_modules: str | list[str] = ALL_LINEAR
    #: Modules trained in full beside the adapters and saved with them (peft's ``modules_to_save``, e.g.
    #: ``[lm_head]``); not with a reference-update plugin.
    modules_to_save: list[str] | None = None
    #: The rank (>= r) of the reference adapter that a reference-update plugin moves; ``null`` =
    #: 2·r (aligner/models/lora.py).
    reference_rank: int | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"model.lora.r must be >= 1 (the adapters' rank), got {self.r}; e.g. r: 8")
        _positive("model.lora.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
            raise ConfigError(f"model.lora.target_modules must be {ALL_LINEAR!r} or a list of module names "
                              f"(e.g. [q_proj, v_proj]), got {self.target_modules!r}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError(f"model.lora.target_modules is an empty list; name modules (e.g. [q_proj, v_proj]) "
                              f"or leave it out for {ALL_LINEAR!r}")
        if self.reference_rank is not None and self.reference_rank < self.r:
            raise ConfigError(f"model.lora.reference_rank must be >= model.lora.r ({self.r}), got "
                              f"{self.reference_rank}; leave it out for 2·r")

    @property
    def ref_rank(self) -> int:
        """The reference adapter's rank: ``reference_rank``, else 2·r."""
        return self.reference_rank or 2 * self.r


@dataclass
class ModelConfig:
    #: A Hub model ID (``meta-llama/Meta-Llama-3-8B-Instruct``), a local HF checkpoint folder, or
    #: ``embedded:tiny-sort`` (the project's own tiny Llama, warmed up on the embedded task) / ``embedded:tiny-random``.
    name_or_path: str = "embedded:tiny-sort"
    #: A different reference model (Hub ID or folder, as TRL's ``ref_model``); default: the policy's initial weights.
    reference_path: str | None = None
    #: The Hub revision (branch, tag or commit) of every model named by Hub ID; default: ``main``.
    revision: str | None = None
    #: Another tokenizer (Hub ID or folder) instead of the policy's own.
    tokenizer: str | None = None
    #: A Jinja chat template (the template text, or the path of a file holding it) that replaces the tokenizer's.
    chat_template: str | None = None
    #: ``auto`` (bfloat16 on a GPU that supports it, float32 on the CPU), ``float32`` or ``bfloat16`` (training
    #: precision; bf16 keeps DeepSpeed's fp32 master weights) (aligner/scoring/batch_path.py). The resolved dtype is in the
    #: ``batch path:`` log line and ``plan.json``.
    dtype: str = "auto"
    #: ``auto`` (packed runs: ``varlen``, aligner's attention, on the kernel the start-up self-check picks:
    #: flash-attn, then PyTorch's ``varlen_attn``, then SDPA per segment on GPU; SDPA per segment on CPU; padded
    #: runs: sdpa; soft-capped attention (Gemma-2): eager, padded), ``sdpa``, ``eager``, ``flash_attention_2``
    #: (bf16 only), ``varlen`` (aligner/models/attention.py).
    attn_implementation: str = "auto"
    #: Recompute the policy's decoder layers in the backward pass (less activation memory, ~1/3 more compute).
    gradient_checkpointing: bool = False
    #: Only when you trust the checkpoint's code: it runs Python shipped with the model.
    trust_remote_code: bool = False
    #: LoRA adapters instead of full fine-tuning (a mapping of :class:`LoraSection` keys); ``null`` = full weights.
    #: ``--set model.lora.r=16`` turns it on.
    lora: LoraSection | None = None

    def __post_init__(self) -> None:
        _one_of("model.dtype", self.dtype, ("auto", "float32", "bfloat16"))
        _one_of("model.attn_implementation", self.attn_implementation, ("auto", "sdpa", "eager", "flash_attention_2", "varlen"))


#: The arguments of ``apply_chat_template`` that aligner sets itself, refused in ``data.chat_template_kwargs``.
TEMPLATE_ARGUMENTS = ("conversation", "tools", "tokenize", "add_generation_prompt", "continue_final_message",
                      "return_dict", "return_assistant_tokens_mask")


@dataclass
class DataConfig:
    #: A Hub dataset ID, a jsonl/json/parquet/csv/arrow file, a dataset folder (``save_to_disk``, or a repository
    #: folder with split-named files), ``embedded:train``, or a mixture: a list of ``{path, split, subset, samples,
    #: columns}`` entries (``samples``: a row count or a fraction).
    train: str | list[Any] = "embedded:train"
    #: Same forms as ``train``; ``null`` for no evaluation.
    eval: str | list[Any] | None = "embedded:eval"
    #: The split of ``train`` to read, for datasets with splits (e.g. ``train_prefs``); ``null``: ``train``.
    #: Refused for a dataset without splits (a single file), where it would be ignored.
    train_split: str | None = None
    #: The split of ``eval`` to read, for datasets with splits (e.g. ``test_prefs``); ``null``: ``test``.
    #: Refused for a dataset without splits (a single file, the embedded task), where it would be ignored.
    eval_split: str | None = None
    #: The dataset's configuration (``load_dataset``'s ``name``), for datasets with several; refused for a single file
    #: (name it in that dataset's mixture entry instead).
    subset: str | None = None
    #: The dataset's column names for aligner's: ``{prompt: question, chosen: response_j, rejected: response_k}``
    #: (also ``completion``, ``label``, ``id``).
    columns: dict[str, str] | None = None
    #: A share of the train rows held out as the eval split (a permutation seeded by ``train.seed``); 0 = none.
    #: Needs ``data.eval: null``.
    eval_fraction: float = 0.0
    #: Processes that tokenize; ``null`` = one per core (up to 8) for 10k rows or more, else one.
    num_proc: int | None = None
    #: Longest prompt+response in tokens; longer rows are truncated (prompt from the left, then response).
    max_length: int = 1024
    #: Prompts are left-truncated to this many tokens first; ``null`` = no separate prompt limit.
    max_prompt_length: int | None = None
    #: ``error`` stops at the first bad row (naming row and column); ``skip`` drops bad rows and reports how many
    #: and why.
    on_bad_row: str = "error"
    #: ``false`` takes the rows in file order (as TRL's ``train_sampling_strategy="sequential"``), e.g. for benchmarks.
    shuffle: bool = True
    #: Extra keyword arguments for the chat template of conversational rows (e.g. ``{enable_thinking: false}``),
    #: under a row's own ``chat_template_kwargs`` column (TRL's, which wins); a row's ``tools`` column is passed as
    #: ``tools``. Not the arguments aligner sets itself (``tools``, ``add_generation_prompt``, ...).
    chat_template_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _positive("data.max_length", self.max_length)
        if self.max_prompt_length is not None:
            _positive("data.max_prompt_length", self.max_prompt_length)
            if self.max_prompt_length >= self.max_length:
                raise ConfigError(
                    f"data.max_prompt_length ({self.max_prompt_length}) must be below data.max_length "
                    f"({self.max_length}) to leave room for the response"
                )
        _one_of("data.on_bad_row", self.on_bad_row, ("error", "skip"))
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_fraction and self.eval:
            raise ConfigError(f"data.eval_fraction={self.eval_fraction} carves the eval split out of data.train, but "
                              f"data.eval is set too ({self.eval}); set data.eval: null, or data.eval_fraction: 0")
        if self.num_proc is not None:
            _positive("data.num_proc", self.num_proc)
        taken = sorted(set(self.chat_template_kwargs or {}) & set(TEMPLATE_ARGUMENTS))
        if taken:
            raise ConfigError(f"data.chat_template_kwargs.{taken[0]}: aligner sets {', '.join(TEMPLATE_ARGUMENTS)} "
                              f"itself (tools come from the rows' tools column); remove {taken[0]} from "
                              f"data.chat_template_kwargs")


@dataclass
class TrainConfig:
    max_steps: int = 1000  #: optimizer steps
    micro_batch_size: int = 8  #: preference pairs (unpaired data: completions) per rank per micro-step
    grad_accum: int = 1  #: micro-steps per optimizer step
    lr: float = 1e-6  #: peak learning rate (AdamW); TRL's DPO default
    lr_schedule: str = "linear"  #: ``linear`` decay to 0, ``cosine``, or ``constant``, after ``train.warmup_steps``
    warmup_steps: int = 0  #: optimizer steps of linear warm-up before ``train.lr_schedule``
    weight_decay: float = 0.0  #: AdamW's weight decay
    max_grad_norm: float = 1.0  #: 0 disables clipping
    save_every: int = 0  #: save a checkpoint every N steps (0: only at the end)
    #: Also save once this many minutes of wall-clock (rank 0's clock, agreed by every rank at the end of a step)
    #: passed since the last save (0: off).
    save_every_minutes: float = 0.0
    log_every: int = 1  #: log (to every logger of ``report_to``) every N steps
    #: The random seed: the sampler's order, ``data.eval_fraction``'s hold-out, the LoRA adapters' A, torch's RNG.
    seed: int = 42
    zero_stage: int = 3  #: DeepSpeed ZeRO stage of the policy (0-3)
    offload_optimizer: bool = False  #: ZeRO-Offload of the optimizer to the CPU (DeepSpeedCPUAdam where its op builds)
    offload_params: bool = False  #: ZeRO-Offload of the parameters to the CPU
    #: A DeepSpeed JSON file whose keys override the generated DeepSpeed config.
    deepspeed_config: str | None = None
    #: Compute the log-probs of models that never change (the anchor; the reference while no plugin moves it)
    #: once, in a pre-pass over the eval split and the train examples the run's steps will draw (a short run scores
    #: only its own steps' pairs; a resumed or longer one adds what it lacks), cache them under
    #: ``output_dir/static_logps`` (reused on resume when the weights' fingerprint matches) and drop their engines
    #: (aligner/scoring/static_logps.py): a plain DPO run then runs no reference forward during its steps. Not for unpaired
    #: data, and the reference stays live when the loss needs it on mismatched pairs (a KTO-style loss, ``kl_pairs``).
    cache_static_logps: bool = True
    #: Pack each micro-batch's chosen and rejected sequences into one row without padding (aligner/data/packing.py).
    #: Positions restart per sequence (attention per sequence: SDPA on each sequence's slice on CPU, varlen kernels
    #: on GPU). Unpaired (KTO-style) batches stay padded, except under ``train.sequence_parallel`` > 1, which packs
    #: them too; a run that cannot pack falls back to padded batches and says why in its ``batch path:`` log line
    #: (aligner/scoring/batch_path.py).
    packing: bool = True
    #: With packing, lay each pair out as [prompt, chosen, rejected] and compute the shared prompt once (exact;
    #: aligner/data/packing.py). Needs ``model.attn_implementation`` ``auto`` or ``varlen``, else the run packs
    #: unshared and says so (``batch path:`` log line).
    prefix_sharing: bool = True
    #: Score only response tokens, this many at a time, from the hidden states and the LM head, so the
    #: (tokens x vocab) fp32 logits are never held at once (aligner/scoring/logps.py); 0 = full logits (the naive path).
    #: A model that transforms its logits after the head (softcapping, ``logit_scale``, a head that is not a plain
    #: ``Linear``) is scored with full logits and the run says so (aligner/scoring/batch_path.py).
    logps_chunk_tokens: int = 1024
    #: Deal each micro-step's pairs to the ranks by length (longest first, snake-wise), so ranks carry equal
    #: tokens; the pairs of every step, the determinism and the exact resume are unchanged (aligner/data/sampler.py).
    #: ``perf/rank_imbalance`` shows it.
    balance_ranks: bool = True
    #: Keep only the newest N checkpoints (0: keep all); older ones go only after the new one is published.
    keep_last: int = 0
    #: A NaN/inf loss or gradient: ``stop`` (save the last good step, name the step and examples, exit 3) or ``skip``
    #: (drop micro-batches whose loss is non-finite and draw the next ones).
    on_nonfinite: str = "stop"
    #: Seconds a collective may wait for another rank before the job fails (gloo/NCCL timeout).
    dist_timeout_s: int = 1800
    #: With ``--resume auto``, seconds to wait for another job that holds ``output_dir`` (its lock, aligner/training/joblock.py)
    #: to finish, e.g. a preempted job still saving when the scheduler relaunches; other runs are refused at once.
    lock_wait_s: float = 600.0
    #: Ranks that share each packed row (DeepSpeed's Ulysses sequence parallelism, aligner/scoring/sequence_parallel.py):
    #: world / N data-parallel groups draw the data; each rank holds 1/N of every row's tokens. 1 = off. N must
    #: divide the number of ranks and the model's head counts.
    sequence_parallel: int = 1

    def __post_init__(self) -> None:
        for key in ("max_steps", "micro_batch_size", "grad_accum", "log_every", "sequence_parallel"):
            _positive(f"train.{key}", getattr(self, key))
        _positive("train.lr", self.lr)
        _positive("train.dist_timeout_s", self.dist_timeout_s)
        _one_of("train.on_nonfinite", self.on_nonfinite, ("stop", "skip"))
        for key in ("warmup_steps", "save_every", "max_grad_norm", "weight_decay", "logps_chunk_tokens", "keep_last",
                    "save_every_minutes", "lock_wait_s"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        _one_of("train.lr_schedule", self.lr_schedule, ("linear", "cosine", "constant"))
        _one_of("train.zero_stage", self.zero_stage, (0, 1, 2, 3))


@dataclass
class EvalConfig:
    every: int = 0  #: evaluate every N optimizer steps (0: only before training and at the end)
    batch_size: int = 16  #: preference pairs per rank per eval micro-batch
    #: A reward model (folder or Hub ID, ``AutoModelForSequenceClassification``) that judges the policy's greedy
    #: generations on ``data.eval``'s prompts against the policy's before training (aligner/evaluation/reward_eval.py).
    reward_model: str | None = None
    reward_epsilon: float = 0.0  #: a negative flip when R(x, y_pre) − R(x, y_θ) > this
    reward_max_new_tokens: int = 64  #: generation length for the reward-model judge

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError(f"eval.every must be >= 0, got {self.every}")
        _positive("eval.batch_size", self.batch_size)
        _positive("eval.reward_max_new_tokens", self.reward_max_new_tokens)
        if self.reward_epsilon < 0:
            raise ConfigError(f"eval.reward_epsilon must be >= 0, got {self.reward_epsilon}")


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ExportConfig:
    #: Under ``model.lora``: also write the merged model (base + adapters) to ``final/merged`` (from_pretrained loads it).
    merge_lora: bool = False
    #: Upload ``final/`` (with ``final/merged``) to the Hugging Face Hub once the export is complete (rank 0).
    push_to_hub: bool = False
    #: The Hub repository to push to, ``<user or org>/<name>``; required with ``push_to_hub``.
    hub_model_id: str | None = None
    #: Create the repository private (a repository that exists keeps its visibility).
    hub_private: bool = False
    #: The branch to push to (created from the default branch when missing); ``null`` = ``main``.
    hub_revision: str | None = None

    def __post_init__(self) -> None:
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("export.push_to_hub: true needs export.hub_model_id, the repository to push to "
                              "(e.g. export.hub_model_id: my-org/my-model)")
        if self.hub_model_id is not None and not _REPO_ID.match(self.hub_model_id):
            raise ConfigError(f"export.hub_model_id must be <user or org>/<name> (letters, digits, '-', '_', '.'), "
                              f"got {self.hub_model_id!r}; e.g. my-org/my-model")


#: The loss a run gets when ``--plugins`` (and the config's ``plugins``) name none.
DEFAULT_LOSS = "dpo"
#: The loggers a run gets when the config has no ``report_to`` (``report_to: none`` for no logger).
DEFAULT_LOGGERS = ("tensorboard",)


@dataclass
class RunConfig:
    output_dir: str = "runs/tiny"  #: where TensorBoard, checkpoints and the export go
    plugins: list[str] = field(default_factory=lambda: [DEFAULT_LOSS])  #: plugin names; ``--plugins a,b`` overrides
    #: The loggers (TRL's ``report_to``): any of ``tensorboard``, ``wandb``, ``mlflow``, ``trackio`` and installed
    #: third-party logger plugins, as a list (``--set report_to=[tensorboard,wandb]``), or ``none``; the config's
    #: plugins are the rest.
    report_to: list[str] = field(default_factory=lambda: list(DEFAULT_LOGGERS))
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    #: One dataclass instance per active plugin that has options, by section name.
    sections: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.export.merge_lora and self.model.lora is None:
            raise ConfigError("export.merge_lora: true merges LoRA adapters into the base, but model.lora is not set "
                              "(a full run's final/ is already a merged model); set model.lora, or remove export.merge_lora")

    def section(self, name: str) -> Any:
        """The options of plugin section ``name`` (e.g. ``config.section("dpo").beta``)."""
        return self.sections[name]

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "sections"}
        out.update({k: _plain(v) for k, v in self.sections.items()})
        return out


CORE_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig,
                 "export": ExportConfig}
CORE_SCALARS = {"output_dir": str, "plugins": list, "report_to": list}


def read_yaml(path: str | Path | None) -> dict[str, Any]:
    """Read a config file into a dict; ``None`` gives an empty config."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass --config with the path of a YAML file (see configs/)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys (model:, data:, train:, ...), got {type(raw).__name__}")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML scalars) onto a raw config dict."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.lr=5e-7")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def build_config(
    raw: dict[str, Any],
    plugin_sections: dict[str, type] | None = None,
    inactive_sections: dict[str, str] | None = None,
    source: str = "config",
    overridden: dict[str, str] | None = None,
) -> RunConfig:
    """Turn a raw dict (YAML + overrides) into a typed :class:`RunConfig`.

    :param plugin_sections: section name -> dataclass, from the active plugins.
    :param inactive_sections: section name -> "plugin 'x', which is not active; add it to --plugins" (or
        ``report_to``), for installed plugins that are not active (their sections get that error instead of
        "unknown key"; :func:`aligner.registry.inactive_sections`).
    :param source: where ``raw`` came from, for error messages.
    :param overridden: dotted key -> the ``--set key=value`` item that set it: errors about
        that key name the ``--set`` item instead of ``source``.
    """
    plugin_sections = plugin_sections or {}
    inactive_sections = inactive_sections or {}
    origin = _Origin(source, overridden or {})
    kwargs: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    for key, value in raw.items():
        if key in CORE_SCALARS:
            kwargs[key] = _coerce(value, CORE_SCALARS[key] if CORE_SCALARS[key] is not list else list[str], key, origin(key))
        elif key in CORE_SECTIONS:
            kwargs[key] = _build_section(CORE_SECTIONS[key], value, key, origin)
        elif key in plugin_sections:
            sections[key] = _build_section(plugin_sections[key], value, key, origin)
        elif key in inactive_sections:
            where = origin(key)
            fix = "or remove the section" if where == source else "or drop that --set"
            raise ConfigError(f"{where}: section '{key}' configures {inactive_sections[key]}, {fix}")
        else:
            known = sorted([*CORE_SCALARS, *CORE_SECTIONS, *plugin_sections])
            raise ConfigError(f"{origin(key)}: unknown key '{key}'; the top-level keys are {', '.join(known)}")
    for key, cls in plugin_sections.items():
        sections.setdefault(key, _build_section(cls, {}, key, origin))
    return RunConfig(**kwargs, sections=sections)


class _Origin:
    """Where a key's value came from: the ``--set`` item that set it, else the config file."""

    def __init__(self, source: str, overridden: dict[str, str]) -> None:
        self.source, self.overridden = source, overridden

    def __call__(self, key: str) -> str:
        """The origin of ``key``; of a section, the first ``--set`` item under it (``--set kto.beta=1`` made the
        ``kto`` section when the config file has none)."""
        if key in self.overridden:
            return f"--set {self.overridden[key]}"
        under = [item for name, item in self.overridden.items() if name.startswith(f"{key}.")]
        return f"--set {under[0]}" if under else self.source

    def of_message(self, message: str, prefix: str, names: set[str]) -> str:
        """The origin of the first key of section ``prefix`` that a validation message names, as ``prefix.key`` or
        (a plugin's own check, e.g. ``weight must be ...``) as the bare key."""
        named = [(message.find(f"{prefix}.{n}"), -len(n), n) for n in names if f"{prefix}.{n}" in message]
        if not named:
            named = [(m.start(), -len(n), n) for n in names if (m := re.search(rf"(?<![\w.]){re.escape(n)}\b", message))]
        return self(f"{prefix}.{min(named)[2]}") if named else self.source  # the longest at the first place


def _build_section(cls: type, value: Any, prefix: str, origin: _Origin) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{origin(prefix)}: '{prefix}' must be a mapping of options, got {value!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, item in value.items():
        if key not in names:
            raise ConfigError(f"{origin(f'{prefix}.{key}')}: unknown key '{prefix}.{key}'; the keys of '{prefix}' are "
                              f"{', '.join(sorted(names))}")
        kwargs[key] = _coerce(item, hints[key], f"{prefix}.{key}", origin(f"{prefix}.{key}"), origin)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{origin.of_message(str(exc), prefix, names)}: {exc}") from exc
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{origin.of_message(str(exc), prefix, names)}: section '{prefix}': {exc}") from exc


def _coerce(value: Any, tp: Any, key: str, source: str, where: _Origin | None = None) -> Any:
    """Check ``value`` against the annotation ``tp``; numbers may come as strings (YAML reads 5e-7 as one).

    A dataclass annotation is a nested section (``model.lora``), built from a mapping by :func:`_build_section`.
    """
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _wrong(key, source, "a mapping of options", value)
        return _build_section(tp, value, key, where or _Origin(source, {}))
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source, where)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise _wrong(key, source, "a list", value)
        return [_coerce(v, item_tp, key, source) for v in value]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _wrong(key, source, "true or false", value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _wrong(key, source, "an integer", value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _wrong(key, source, "a number", value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _wrong(key, source, "a string", value)
    if tp is dict or typing.get_origin(tp) is dict:
        if isinstance(value, dict):
            return value
        raise _wrong(key, source, "a mapping", value)
    return value


def _wrong(key: str, source: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{source}: key '{key}' expects {expected}, got {value!r} ({type(value).__name__})")


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def _one_of(key: str, value: Any, options: tuple) -> None:
    if value not in options:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, options))}; got {value!r}")


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
