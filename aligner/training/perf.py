"""Speed and memory of the training steps: the ``perf/*`` TensorBoard tags.

- ``perf/tokens_per_s``: real (non-pad) prompt+response tokens fed to the
  policy, summed over ranks, per second of the slowest rank's step time.
- ``perf/step_time_s``: wall-clock seconds of the step, slowest rank.
- ``perf/cpu_s``: CPU seconds (user + system) the step took, summed over
  ranks; unlike wall time it barely moves when other jobs share the cores.
- ``perf/peak_mem_gib``: peak memory so far, the largest rank: GPU memory
  allocated by torch on GPU, the process's peak resident set size on CPU.
- ``perf/mfu`` (GPU only): useful model FLOPs per second over the device's
  dense peak. Useful FLOPs per sequence of s real tokens (PaLM's accounting,
  Chowdhery et al. 2022, arXiv:2204.02311, App. B, with a causal mask's half):
  (6N + 2N·F)·s + (6 + 2F)·n_layers·d_model·s², N being the matmul parameters
  (all but the input embedding), F the number of frozen models (reference,
  anchor) whose forward actually ran. 6N per policy token is forward plus
  backward; 2N per frozen token is a forward. Padding and recomputation
  (gradient checkpointing, the chunked LM head's backward) are not useful FLOPs.
"""

from __future__ import annotations

import resource
import time

import torch
import torch.distributed as dist

from aligner.data.batch import Batch
from aligner.distributed.comm import comm_device
from aligner.hookspecs import Engines

#: Dense peak FLOP/s by GPU name and dtype (vendor data sheets: H100/H200 SXM 989.4 TFLOP/s bf16,
#: 66.9 fp32; A100 312 bf16, 19.5 fp32).
PEAK_FLOPS = {
    "H100": {"bfloat16": 989.4e12, "float32": 66.9e12},
    "H200": {"bfloat16": 989.4e12, "float32": 66.9e12},
    "A100": {"bfloat16": 312e12, "float32": 19.5e12},
}


def peak_mem_gib() -> float:
    """This process's peak memory: torch's GPU allocations on GPU, peak RSS on CPU (Linux reports KiB)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_flops(dtype: str) -> float | None:
    """The current GPU's dense peak FLOP/s for ``dtype``; ``None`` on CPU or an unknown GPU (no MFU then)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, by_dtype in PEAK_FLOPS.items():
        if key in name:
            return by_dtype.get(dtype)
    return None


def _numel(p: torch.nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 partitions leave p.numel() == 0


def matmul_params(model) -> int:
    """Parameters that take part in a matmul per token: all but an untied input embedding (a lookup)."""
    model = getattr(model, "module", model)
    total = sum(_numel(p) for p in model.parameters())
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or embed.weight is not head.weight:
        total -= _numel(embed.weight)
    return total


class PerfMeter:
    """Counts one optimizer step's tokens and useful FLOPs, then reports the ``perf/*`` metrics."""

    def __init__(self, engines: Engines, dtype: str) -> None:
        config = getattr(engines.policy, "module", engines.policy).config
        self.n_params = matmul_params(engines.policy)
        # n_layers * d_model for the attention term; 0 (no attention FLOPs counted) for configs without them
        self.attn_per_token2 = getattr(config, "num_hidden_layers", 0) * getattr(config, "hidden_size", 0)
        frozen = {id(e) for e in (engines.reference, engines.anchor) if e is not None}
        self.n_frozen = len(frozen)  # the anchor shares the reference's forward when it is the same engine
        self.peak = peak_flops(dtype)
        self.tokens = 0
        self.flops = 0.0
        self.cpu_started = time.process_time()

    def start(self) -> None:
        """Mark the start of a step (for ``perf/cpu_s``)."""
        self.cpu_started = time.process_time()

    def count(self, batch: Batch) -> None:
        """Add one micro-batch (padded or packed) to the current step."""
        lengths = batch.sequence_lengths().double()
        self.tokens += batch.real_tokens()
        flops = (6 + 2 * self.n_frozen) * (self.n_params * lengths + self.attn_per_token2 * lengths**2).sum()
        self.flops += batch.work_share * float(flops)  # a sequence-parallel rank does 1/N of its row's work

    def step_metrics(self, elapsed: float) -> dict[str, float]:
        """The step's ``perf/*`` values over all ranks (a collective: every rank calls it), then reset."""
        cpu = time.process_time() - self.cpu_started
        device = comm_device()
        sums = torch.tensor([self.tokens, self.flops / elapsed, cpu], dtype=torch.float64, device=device)
        maxes = torch.tensor([elapsed, peak_mem_gib(), self.tokens], dtype=torch.float64, device=device)
        world = 1
        if dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            dist.all_reduce(sums)
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
        (tokens, flops, cpu), (slowest, peak_mem, busiest) = sums.tolist(), maxes.tolist()
        # A step ends when its slowest rank does: the job's tokens over that time.
        out = {"perf/tokens_per_s": tokens / slowest, "perf/step_time_s": slowest, "perf/peak_mem_gib": peak_mem,
               "perf/cpu_s": cpu,
               # the busiest rank's real tokens over the mean rank's: 1.0 when balanced (train.balance_ranks)
               "perf/rank_imbalance": busiest * world / tokens if tokens else 1.0}
        if self.peak:
            out["perf/mfu"] = flops / (self.peak * world)
        self.tokens, self.flops = 0, 0.0
        return out
