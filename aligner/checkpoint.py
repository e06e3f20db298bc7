"""Save and restore DeepSpeed checkpoints, and export the policy in Hugging Face format.

Checkpoints live under ``output_dir/checkpoints/step_<N>`` (DeepSpeed's own
layout: ZeRO shards, optimizer and LR-scheduler state) with the run's own
state (step, sampler position, plugin states, RNG) as DeepSpeed client state.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

TAG = re.compile(r"^step_(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those DeepSpeed finished writing), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := TAG.match(p.name))]
    return [p for _, p in sorted(found) if any(p.iterdir())]


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


def save(engine, output_dir: str | Path, step: int, client_state: dict[str, Any],
         write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``checkpoints/step_<step>`` on every rank (a collective call).

    ``write_extra(folder)`` runs on every rank after the engine's shards are
    written, for per-rank state of plugins (``aligner_save_checkpoint``).
    """
    root = checkpoint_root(output_dir)
    engine.save_checkpoint(str(root), tag=f"step_{step}", client_state=client_state)
    folder = root / f"step_{step}"
    if write_extra is not None:
        write_extra(folder)
    if dist.is_initialized():
        dist.barrier()
    return folder


def load(engine, checkpoint_dir: Path) -> dict[str, Any]:
    """Restore engine (weights, optimizer, scheduler) from a checkpoint folder; return its client state."""
    path, client_state = engine.load_checkpoint(str(checkpoint_dir.parent), tag=checkpoint_dir.name)
    if path is None:
        raise ValueError(f"--resume: {checkpoint_dir} is not a readable DeepSpeed checkpoint")
    return client_state


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The policy's full weights, gathered from the ZeRO-3 shards: on rank 0 (None elsewhere).

    Must be called on every rank.
    """
    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
    rank = dist.get_rank() if dist.is_initialized() else 0
    return state if rank == 0 else None


def export_hf(engine, tokenizer, out_dir: str | Path) -> Path:
    """Write the policy as a Hugging Face checkpoint (safetensors, config, tokenizer). Collective."""
    out_dir = Path(out_dir)
    state = full_state_dict(engine)
    if state is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        engine.module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    if dist.is_initialized():
        dist.barrier()
    return out_dir
