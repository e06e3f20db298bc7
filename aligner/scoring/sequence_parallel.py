"""Ulysses sequence parallelism (``train.sequence_parallel: N``): N ranks share every packed row.

DeepSpeed's implementation does the parallel part (``deepspeed.runtime.sequence_parallel``, ALST,
arXiv 2506.13996). ``UlyssesSPAttentionHF.register_with_transformers`` builds the process groups and wraps
the run's core attention function in transformers' attention registry. Around each attention layer, one
all-to-all regroups q/k/v from "my L/N tokens, all heads" to "all L tokens, H/N heads". The core attention
then runs on the whole row for those heads, and a second all-to-all returns its output to "my tokens, all
heads". That is two all-to-alls per attention layer forward, and two more in backward. Everything else
(embeddings, MLPs, norms, the LM head) runs on the rank's own L/N tokens, so activations shrink N-fold.

What aligner adds, and why each part is exact:

- **The layout** (:class:`Layout`). DeepSpeed groups consecutive ranks: SP group g is ranks
  [g·N, (g+1)·N). The sampler, the evaluation and the static pre-pass shard the data over the world/N
  data-parallel groups (``dp_rank = rank // N``), so the N ranks of a group draw the same micro-batch.
  ZeRO-3 partitions every parameter over all ranks (DeepSpeed's sequence-data-parallel group, the whole
  world), and the policy and the reference are partitioned alike, so the trust-region update on the local
  shards (aligner/reference/trust_region.py) stays exact. DeepSpeed counts world/N data-parallel ranks for the batch
  size (the ``mpu`` handed to ``deepspeed.initialize``); how it averages gradients is the last point below.
- **The core attention is aligner's** (aligner/models/attention.py). The rank's row is a contiguous slice of the
  whole packed row. The forward kwargs that describe attention (``cu_seq_lens``, and for prefix-shared rows the
  key gather index) describe the *whole* row, because the core attention runs on the whole row after the
  first all-to-all. So a rejected token sees the prompt and never chosen, whichever rank holds either.
  The attention function itself is unchanged.
- **Sharding** (:class:`ShardedBatch`). Every rank of a group builds the same batch from the same
  examples, packed: pairs as the run's layout packs them, and unpaired completions and the mismatched KL rows
  (``kl_pairs``) with :func:`aligner.data.packing.pack_batch`, which the batch path chooses for them under SP
  (without SP they stay padded). The row is padded at its end to a multiple of N: the padding joins the last sequence, is never
  scored, and only attends backwards. Each rank keeps tokens [r·L/N, (r+1)·L/N). A logit position
  scores its target wherever the position lies, so the token after a shard boundary is scored by the rank
  that holds the position before it (DeepSpeed's adapter does this with ``shift_labels``; prefix sharing
  scores the first rejected token from the last prompt token, which no shift can say, hence an explicit list).
- **Sums over the group** (:class:`_SumOverShards`). Each rank sums the log-probs of the tokens it scored,
  per sequence. An all-reduce gives every rank the whole sequences' sums S = Σ_r s_r, so every rank computes the
  same loss L(S). Rank r's true gradient is ∂L/∂s_r = ∂L/∂S, and its parameter gradient g_r is its shard's part
  of the group's gradient Σ_r g_r. DeepSpeed's ZeRO-3 reduce-scatter averages the parameter gradients over the
  whole world, not over the world/N data-parallel groups (``deepspeed/runtime/zero/stage3.py``
  ``__avg_scatter_grads`` → ``reduce_scatter_coalesced`` divides by the world size). So each rank back-propagates
  N·∂L/∂S, which is the backward of an all-reduce (the group's N equal gradients summed), computed without the
  collective: (1/world)·Σ N·g_r = (1/dp)·Σ_groups Σ_r g_r. DeepSpeed 0.19.8 divides by world/N instead in ZeRO
  stages 1–2 and in ZeRO-3's contiguous path without reduce-scatter, so those are refused (:func:`check_config`); the
  exactness test (tests/test_sequence_parallel_e2e.py) compares every gradient against one rank. The token
  counts come from the whole row's scoring list, with no collective.

DeepSpeed's ``UlyssesSPDataLoaderAdapter`` is not used. It deals each SP rank's own batch to the whole group
in turn (SP over DP: N micro-steps per draw, with a sampler over the whole world), and it carries
``labels``/``shift_labels`` in ``[bs, seqlen]`` tensors. Neither fits preference rows (several sequences, the
prefix-shared scoring list, attention metadata over the whole row). Its tiled logits loss
(``TiledFusedLogitsLoss``) runs backward inside forward for a scalar loss. Our losses are nonlinear in
per-sequence sums, so the chunked head (aligner/scoring/logps.py) does that job.

What DeepSpeed's Ulysses cannot run is refused before any engine is built (:func:`check_config` from the config
alone, :func:`check` once the model, data and batch path are known): N not dividing the world; a head count that N
does not divide; a KV head count that N neither divides nor is a multiple of (DeepSpeed splits KV heads, or
replicates them when N is a multiple); ``eager`` (DeepSpeed refuses it) and ``sdpa`` by name (the
wrapper drops the mask, so a packed row would attend across its sequences); padded batches
(``train.packing: false``: its wrapper has one fixed batch size, and this module shards one packed row);
generation (``eval.reward_model``: a KV cache grows one token at a time, which
a row sharded N ways cannot do); ZeRO stages other than 3 (their gradient average, above).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from aligner.config import ConfigError
from aligner.data.batch import Batch
from aligner.distributed.comm import comm_device
from aligner.models import attention, loading

#: Core attention implementations DeepSpeed's wrapper can run a packed row through: they read the sequence
#: bounds from ``cu_seq_lens`` (aligner's own; flash-attn's), not from a mask the wrapper drops.
WRAPPABLE = (attention.VARLEN, "flash_attention_2", "flash_attention_3")


@dataclass(frozen=True)
class Layout:
    """Where this rank sits: ``size`` ranks per sequence (N), its ``rank`` among them, and its data-parallel
    group ``dp_rank`` of ``dp_world`` (= world / N). ``group`` and ``mpu`` (DeepSpeed's
    ``parallel_state_sp``, handed to ``deepspeed.initialize``) exist once :func:`register` ran, for N > 1."""

    size: int = 1
    rank: int = 0
    dp_rank: int = 0
    dp_world: int = 1
    group: Any = None
    mpu: Any = None

    def describe(self) -> str:
        """The ``sequence parallel:`` log line's text."""
        return (f"{self.size} ranks per sequence (DeepSpeed Ulysses: 2 all-to-alls per attention layer), "
                f"{self.dp_world} data-parallel group{'s' if self.dp_world > 1 else ''}")


_ACTIVE: tuple[Layout, str] | None = None  # the registered layout and core attention (one per process)


def layout_for(cfg, rank: int, world: int) -> Layout:
    """The layout of ``rank`` of ``world`` under ``cfg.train.sequence_parallel``; refuses, from the config alone,
    what the run could never shard (:func:`check_config`). Every rank decides alike."""
    size = cfg.train.sequence_parallel
    check_config(cfg, world)
    return Layout(size, rank % size, rank // size, world // size)


def check_config(cfg, world: int) -> None:
    """Refuse from the config alone: N not dividing the world, a ZeRO setup whose gradient average differs from
    the one this module scales for, padded batches asked for, an attention implementation named that
    DeepSpeed's wrapper cannot run, generation (``eval.reward_model``)."""
    size = cfg.train.sequence_parallel
    if size == 1:
        return
    key = f"train.sequence_parallel={size}"
    if world % size:
        divisors = [n for n in range(1, world + 1) if world % n == 0]
        raise ConfigError(
            f"train.sequence_parallel={size} does not divide the number of ranks ({world}): each sequence is shared "
            f"by {size} ranks, so the ranks must form whole groups of {size}. Set train.sequence_parallel to one of "
            f"{divisors}, or launch a multiple of {size} ranks")
    zero = loading.deepspeed_config(cfg)["zero_optimization"]
    if zero.get("stage") != 3 or not zero.get("reduce_scatter", True):
        raise ConfigError(
            f"{key}: sequence parallelism runs under ZeRO-3 with reduce-scatter (DeepSpeed's defaults), got "
            f"zero_optimization stage {zero.get('stage')}, reduce_scatter {zero.get('reduce_scatter', True)}: "
            f"DeepSpeed 0.19.8 averages the gradients over world/N ranks in ZeRO stages 0-2 and without "
            f"reduce-scatter, but over all ranks in ZeRO-3's reduce-scatter, and aligner's gradients are exact for "
            f"the latter. Set train.zero_stage=3 (and leave reduce_scatter on in train.deepspeed_config)")
    if not cfg.train.packing:
        raise ConfigError(f"{key}: sequence parallelism shards one packed row, and train.packing=false asks for "
                          f"padded batches; set train.packing=true, or train.sequence_parallel=1")
    if cfg.model.attn_implementation not in ("auto", "varlen", *WRAPPABLE):
        raise ConfigError(
            f"{key}: model.attn_implementation={cfg.model.attn_implementation} cannot run under DeepSpeed's Ulysses "
            f"attention: the wrapper drops the attention mask, so 'sdpa' would attend across the packed sequences, "
            f"and DeepSpeed refuses 'eager'. Set model.attn_implementation=auto or varlen (or flash_attention_2 "
            f"on a GPU with flash-attn)")
    if cfg.eval.reward_model:
        raise ConfigError(
            f"{key}: eval.reward_model judges greedy generations, and generation with a KV cache cannot run on a "
            f"row split {size} ways; leave eval.reward_model unset (judge the exported model with launch/eval.py), "
            f"or set train.sequence_parallel=1")


def current() -> Layout:
    """This process's registered layout (the default one-rank-per-sequence layout before :func:`register`)."""
    if _ACTIVE is not None:
        return _ACTIVE[0]
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return Layout(1, 0, rank, world)


def head_problem(size: int, heads: int, kv: int) -> str | None:
    """Why DeepSpeed's Ulysses cannot split a model's ``heads`` query and ``kv`` key/value heads ``size`` ways,
    or None."""
    fits = [n for n in range(1, heads + 1) if heads % n == 0 and (kv % n == 0 or n % kv == 0)]
    if heads % size:
        return (f"the model has {heads} attention heads and Ulysses gives each of the {size} ranks of a sequence "
                f"{heads}/{size} of them; set train.sequence_parallel to one of {fits}")
    if kv % size and size % kv:
        return (f"the model has {kv} key/value heads, which {size} ranks can neither split (DeepSpeed needs N to "
                f"divide them) nor replicate (N a multiple of them); set train.sequence_parallel to one of {fits}")
    return None


def check(cfg, path, model_config) -> None:
    """Refuse, before any engine is built, a run that ``train.sequence_parallel > 1`` cannot shard exactly, once
    its model and batch path are known (:func:`check_config` has run).

    :param path: the run's decided :class:`aligner.scoring.batch_path.BatchPath`.
    """
    n = cfg.train.sequence_parallel
    if n == 1:
        return
    key = f"train.sequence_parallel={n}"
    text = model_config.get_text_config()
    problem = head_problem(n, text.num_attention_heads, getattr(text, "num_key_value_heads", None) or
                           text.num_attention_heads)
    if problem:
        raise ConfigError(f"{key}: {problem}")
    if not path.packing:  # packing was asked for (check_config), but this machine cannot run it
        raise ConfigError(
            f"{key}: sequence parallelism shards one packed row, but this run's batches fall back to padded "
            f"({'; '.join(path.fallbacks)}); set train.sequence_parallel=1 here")
    if path.attn_implementation not in WRAPPABLE:
        raise ConfigError(f"{key}: attention {path.attn_implementation} (model.attn_implementation="
                          f"{cfg.model.attn_implementation}) cannot run a packed row under DeepSpeed's Ulysses "
                          f"attention; set model.attn_implementation=auto or varlen")


def register(layout: Layout, attn_implementation: str, model_config) -> Layout:
    """Build DeepSpeed's sequence-parallel groups and wrap ``attn_implementation`` in its Ulysses attention, once
    per process (collective); ``layout`` with its group and ``mpu``. A one-rank layout is returned as it is."""
    global _ACTIVE
    if layout.size == 1:
        return layout
    if _ACTIVE is not None:
        active, attn = _ACTIVE
        if (active.size, active.rank, active.dp_rank, attn) != (layout.size, layout.rank, layout.dp_rank,
                                                                   attn_implementation):
            raise ConfigError(
                f"train.sequence_parallel={layout.size} with attention {attn_implementation}: this process already "
                f"runs {active.size} ranks per sequence with {attn} (DeepSpeed wraps the attention once per "
                f"process); start a new process for another layout")
        return active
    import copy

    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    config = copy.copy(model_config)
    config._attn_implementation = attn_implementation  # what the engines will load with
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        SimpleNamespace(config=config), attn_implementation, layout.size, micro_batch_size=1,
        seq_length_is_variable=True)  # one packed row per forward, of any length
    group = mpu.get_sequence_parallel_group()
    if mpu.get_sequence_parallel_rank() != layout.rank:
        raise RuntimeError(f"DeepSpeed placed this rank at {mpu.get_sequence_parallel_rank()} of its sequence-parallel "
                           f"group, aligner expected {layout.rank} (consecutive ranks per group)")
    layout = replace(layout, group=group, mpu=mpu)
    _ACTIVE = (layout, attn_implementation)
    return layout


def setup(cfg, path, policy_path, layout: Layout) -> Layout:
    """:func:`check` the run against the policy's config, then :func:`register` it (every rank; collective)."""
    if layout.size == 1:
        return layout
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(policy_path, trust_remote_code=cfg.model.trust_remote_code)
    check(cfg, path, model_config)
    return register(layout, path.attn_implementation, model_config)


def local_heads(heads: int, kv_heads: int, size: int) -> tuple[int, int]:
    """The query and key/value heads each rank's core attention runs under Ulysses with ``size`` ranks:
    DeepSpeed gives each rank heads/N query heads, and kv/N key/value heads, or one replicated head when N is a
    multiple of kv (``UlyssesSPAttentionHF.__init__``)."""
    return heads // size, max(kv_heads // size, 1)


def data_parallel() -> tuple[int, int]:
    """(this rank's data-parallel group, the number of groups): what data is sharded over."""
    layout = current()
    return layout.dp_rank, layout.dp_world


class _SumOverShards(torch.autograd.Function):
    """S = Σ_r s_r over the sequence-parallel group of N ranks in forward; N·∂L/∂S in backward, what ZeRO-3's
    world-wide gradient average needs (module doc)."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, group) -> torch.Tensor:
        ctx.size = dist.get_world_size(group)
        total = partial.detach().to(comm_device(group), copy=True)
        dist.all_reduce(total, group=group)
        return total.to(partial.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.size, None


@dataclass(kw_only=True)
class ShardedBatch(Batch):
    """One rank's contiguous part of a packed row: ``input_ids``, ``position_ids`` and ``response_mask`` are
    (1, L/N), the slice [start, start + L/N) of ``whole`` (the row padded to a multiple of N), whose attention
    kwargs the model gets unchanged. ``source`` is the batch before padding (what the row holds for real).
    ``positions``/``targets``/``owner`` (M_r,) are the part of the whole row's scoring list whose logit position
    is this rank's, positions made local; ``whole_counts`` (N_seq,) the whole sequences' scored tokens. Both are
    built on the host, so a forward needs no host sync to find them."""

    position_ids: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    owner: torch.Tensor
    whole_counts: torch.Tensor
    whole: Batch
    source: Batch
    start: int
    layout: Layout

    @property
    def n_sequences(self) -> int:
        return self.whole.n_sequences

    def to(self, device: torch.device | str) -> ShardedBatch:
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self) if torch.is_tensor(getattr(self, f.name))}
        return replace(self, **moved, whole=self.whole.to(device))

    def model_inputs(self) -> dict:
        """The whole row's forward kwargs, with this rank's tokens and positions."""
        return {**self.whole.model_inputs(), "input_ids": self.input_ids, "position_ids": self.position_ids}

    def segments(self) -> Batch:
        """The whole row: the attention gets its segment bounds unchanged."""
        return self.whole

    def score_index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.positions, self.targets, self.owner

    def token_owner(self) -> torch.Tensor:
        return self.owner

    def sequence_lengths(self) -> torch.Tensor:
        return self.source.sequence_lengths()

    def real_tokens(self) -> int:
        """This rank's part of the row's real tokens: their count split as evenly as integers go (the group's
        parts add up to the row's)."""
        total = self.source.real_tokens()
        return total // self.layout.size + (self.layout.rank < total % self.layout.size)

    @property
    def work_share(self) -> float:
        return 1.0 / self.layout.size

    def whole_sequences(self, summed: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _SumOverShards.apply(summed, self.layout.group), self.whole_counts.to(counts.device)


def shard(batch: Batch, layout: Layout, pad_token_id: int) -> ShardedBatch:
    """This rank's part of ``batch`` (one packed row) under ``layout``; its mismatched rows (``kl_pairs``, their
    own packed row) likewise."""
    if batch.input_ids.shape[0] != 1:
        raise TypeError(f"sequence parallelism shards one packed row; got a {type(batch).__name__} of "
                        f"{batch.input_ids.shape[0]} rows")
    length = batch.input_ids.shape[1]
    whole = batch.extended(math.ceil(length / layout.size) * layout.size - length, pad_token_id)
    width = whole.input_ids.shape[1] // layout.size
    start = layout.rank * width
    part = slice(start, start + width)
    positions, targets, owner = whole.score_index()  # (M,) each, over the whole row
    mine = (positions >= start) & (positions < start + width)
    counts = torch.zeros(batch.n_sequences, dtype=torch.long).index_add(0, owner, torch.ones_like(owner))
    mismatched = None if batch.mismatched is None else shard(batch.mismatched, layout, pad_token_id)
    return ShardedBatch(input_ids=whole.input_ids[:, part], position_ids=whole.position_ids[:, part],
                        response_mask=whole.response_mask[:, part], positions=positions[mine] - start,
                        targets=targets[mine], owner=owner[mine], whole_counts=counts, ids=batch.ids,
                        n_chosen=batch.n_chosen, row_index=batch.row_index, paired=batch.paired, whole=whole,
                        source=batch, start=start, layout=layout, mismatched=mismatched)


def shard_collate(collate: Callable[[list], Batch], pad_token_id: int,
                  layout: Layout | None = None) -> Callable[[list], Batch]:
    """``collate``, followed by :func:`shard` under ``layout`` (default: this process's); ``collate`` itself
    with one rank per sequence."""
    layout = current() if layout is None else layout
    if layout.size == 1:
        return collate
    return lambda examples: shard(collate(examples), layout, pad_token_id)
