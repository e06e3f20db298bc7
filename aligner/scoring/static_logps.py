"""Cached log-probs of models that never change (``train.cache_static_logps``).

A frozen model's summed response log-probs depend only on the example, so they
are computed once, in a sharded pre-pass (gathered onto every rank), and looked
up by example id afterwards. The pre-pass scores the eval split and, of the train
split, only the examples the run's steps will draw (``aligner/recipes/train.py``
``static_train_examples``: a 100-step run of a 60k-pair dataset scores 100 global
batches, not 60k pairs); a resumed or longer run scores what it still lacks and
reuses the rest. Static are
the anchor, and the reference while no reference-update plugin moves it. A
reference and an anchor loaded from the same checkpoint share one cache.

Once its cache is complete the model's engine is dropped: a plain DPO run holds
no reference engine during its steps (the policy's forward and backward only,
6N FLOPs per token instead of 8N), and a resumed run whose cache is complete
builds none at all.

The cache lives in ``output_dir/static_logps/<models>.pt``, keyed by split and
example id, with a digest of each example's tokens and a fingerprint of the
model and of how it is scored (the SHA-256 of its weight and config files, and
the run's scoring: dtype, attention implementation and kernel, the batch layout:
packed or padded, prefix-shared, the chunked head's size, the ranks per sequence).
On start the file is reused when the fingerprint matches; a
file written for other weights, other tokens, or one that cannot be read stops
the run with an error saying what to do. ``<models>.json`` beside it records
how many examples each run computed and reused, and whether the dropped engine
was freed.

Exactness: the eval split is scored in the same batches as the evaluation
itself, so its cached values are bitwise those a live forward would give; a
train example's value can differ from a live forward in its training batch by
fp32 rounding (another padding width), ~1e-6.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from aligner.data import Example
from aligner.data.sampler import shard_batches
from aligner.hookspecs import SequenceLogps
from aligner.scoring.logps import score_pairs

log = logging.getLogger(__name__)
FORMAT = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class StaticCacheError(ValueError):
    """A static log-prob cache is stale or unreadable; the message names the file and the fix."""


def cache_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "static_logps"


def fingerprint(model_path: Path, scoring: dict[str, Any]) -> str:
    """SHA-256 of the checkpoint's config and weight files (names and bytes) and of ``scoring`` (how the run scores:
    :func:`aligner.recipes.train.scoring`)."""
    h = hashlib.sha256(json.dumps(scoring, sort_keys=True).encode())
    files = sorted(p for p in Path(model_path).iterdir()
                   if p.is_file() and (p.name == "config.json" or p.name.endswith(WEIGHT_SUFFIXES)))
    for path in files:
        h.update(f"\0{path.name}\0".encode())
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def example_digest(example: Example) -> str:
    """Digest of an example's tokens: a cached value is only valid for exactly these tokens."""
    data = json.dumps([example.prompt_ids, example.chosen_ids, example.rejected_ids]).encode()
    return hashlib.sha1(data).hexdigest()[:16]


@dataclass
class StaticLogps:
    """The cached log-probs of one frozen model: ``(split, id) -> (chosen, rejected, token digest)``."""

    name: str
    fingerprint: str
    scoring: dict[str, Any] = field(default_factory=dict)
    entries: dict[tuple[str, str], tuple[float, float, str]] = field(default_factory=dict)

    def lookup(self, split: str, ids: list[str], device: torch.device | str = "cpu") -> SequenceLogps:
        """The cached summed log-probs of ``ids`` (one split), as float32 tensors of shape (B,)."""
        rows = [self.entries[(split, i)] for i in ids]
        values = torch.tensor([[c, r] for c, r, _ in rows], dtype=torch.float32, device=device)  # (B, 2)
        return SequenceLogps(chosen=values[:, 0], rejected=values[:, 1])

    def split(self, split: str) -> "SplitView":
        return SplitView(self, split)


@dataclass
class SplitView:
    """What ``gather_inputs`` sees: the cache of one split, looked up by the batch's example ids."""

    cache: StaticLogps
    split: str

    def logps(self, ids: list[str], device: torch.device | str = "cpu") -> SequenceLogps:
        return self.cache.lookup(self.split, ids, device)


def save(cache: StaticLogps, path: Path) -> None:
    """Write atomically (temporary file, then rename)."""
    keys = sorted(cache.entries)
    payload = {
        "format": FORMAT, "fingerprint": cache.fingerprint, "scoring": json.dumps(cache.scoring, sort_keys=True),
        "splits": [k[0] for k in keys], "ids": [k[1] for k in keys],
        "digests": [cache.entries[k][2] for k in keys],
        "logps": torch.tensor([cache.entries[k][:2] for k in keys], dtype=torch.float32).reshape(-1, 2),  # (N, 2)
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load(path: Path, name: str, expected_fingerprint: str, model_path: Path, scoring: dict[str, Any]) -> StaticLogps:
    """Read a cache file, refusing one that is unreadable or was computed for other weights."""
    fix = f"delete {path} to recompute it (or set train.cache_static_logps=false)"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        n = len(payload["ids"])
        ok = (payload["format"] == FORMAT and len(payload["splits"]) == n and len(payload["digests"]) == n
              and tuple(payload["logps"].shape) == (n, 2))
    except Exception as exc:  # noqa: BLE001 - any failure to read means the same thing to the user
        raise StaticCacheError(f"static log-prob cache {path} is corrupt ({type(exc).__name__}: {exc}); {fix}") from None
    if not ok:
        raise StaticCacheError(f"static log-prob cache {path} is corrupt (its fields do not match format {FORMAT}); {fix}")
    if payload["fingerprint"] != expected_fingerprint:
        written = json.loads(payload.get("scoring") or "{}")
        changed = [f"{k} {written.get(k)!r} -> {v!r}" for k, v in sorted(scoring.items()) if written.get(k) != v]
        what = (f"scored otherwise ({', '.join(changed)})" if written and changed
                else "computed for other weights" if written else "computed for other weights or another scoring")
        raise StaticCacheError(
            f"static log-prob cache {path} is stale: it was {what} than this run's {name} at {model_path} "
            f"(fingerprint {payload['fingerprint'][:12]}… against {expected_fingerprint[:12]}…); "
            f"point the {name} back at the checkpoint and settings it was computed for, or {fix}"
        )
    values = payload["logps"].tolist()
    entries = {(s, i): (v[0], v[1], d) for s, i, d, v in zip(payload["splits"], payload["ids"], payload["digests"], values)}
    return StaticLogps(name=name, fingerprint=expected_fingerprint, scoring=scoring, entries=entries)


def _broadcast(obj):
    """Rank 0's object on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _on_rank0(fn: Callable[[], object]):
    """Run ``fn`` on rank 0 and give every rank its result, or raise its StaticCacheError on every rank."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    result = None
    if rank == 0:
        try:
            result = ("ok", fn())
        except StaticCacheError as exc:
            result = ("error", str(exc))
    status, value = _broadcast(result)
    if status == "error":
        raise StaticCacheError(value)
    return value


def _check_digests(cache: StaticLogps, splits: dict[str, list[Example]], path: Path) -> None:
    for split, examples in splits.items():
        for ex in examples:
            cached = cache.entries.get((split, ex.id))
            if cached is not None and cached[2] != example_digest(ex):
                raise StaticCacheError(
                    f"static log-prob cache {path} is stale: {split} example {ex.id!r} was cached with other tokens "
                    f"(the data, tokenizer or data.max_length changed); delete {path} to recompute it"
                )


@torch.no_grad()
def _compute(engine, examples: list[Example], split: str, batch_size: int, pad_token_id: int,
             chunk_tokens: int = 0, collate: Callable | None = None) -> dict:
    """This rank's share of ``examples`` through ``engine``, gathered onto every rank."""
    from aligner.scoring.sequence_parallel import data_parallel

    rank, world = data_parallel()  # the ranks that share a sequence score the same examples (alike: a dict merges them)
    local = {}
    for batch_examples, n_real in shard_batches(examples, batch_size, rank, world):
        scored = score_pairs(engine, batch_examples, len(batch_examples), pad_token_id, chunk_tokens, collate)  # one forward
        chosen, rejected = scored.chosen.float().cpu(), scored.rejected.float().cpu()
        for i, ex in enumerate(batch_examples[:n_real]):
            local[(split, ex.id)] = (float(chosen[i]), float(rejected[i]), example_digest(ex))
    parts = [local]
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in part.items()}


def _release(engine) -> weakref.ref:
    """Detach a frozen engine from DeepSpeed's globals; return a weak reference to its module, which is
    freed once the caller drops its last reference to the engine."""
    module = getattr(engine, "module", engine)
    if hasattr(engine, "destroy"):
        engine.destroy()
        # ZeRO-3 appends each engine's top module to a module-level list that nothing pops
        # (deepspeed/runtime/zero/parameter_offload.py, FWD_MODULE_STACK), which would keep the
        # whole model alive; take ours out.
        from deepspeed.runtime.zero import parameter_offload

        stack = getattr(parameter_offload, "FWD_MODULE_STACK", [])
        stack[:] = [m for m in stack if m is not module]
        # ... and memoises, in one process-wide functools.lru_cache, which parameters to release per
        # (coordinator, submodule): clear it (a cache; other engines simply recompute their entries).
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

        fn = getattr(PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__params_to_release", None)
        for _ in range(4):  # through the decorators (instrument_w_nvtx keeps the function in its closure)
            if fn is None or hasattr(fn, "cache_clear"):
                break
            inner = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ()) if callable(c.cell_contents)]
            fn = getattr(fn, "__wrapped__", None) or (inner[0] if inner else None)
        if fn is not None and hasattr(fn, "cache_clear"):
            fn.cache_clear()
    return weakref.ref(module)


def _append_history(path: Path, names: list[str], model_path: Path, cache: StaticLogps, record: dict) -> None:
    """Add this run's pass (computed, reused, engine released) to ``<models>.json`` beside the cache."""
    history_path = path.with_suffix(".json")
    history = json.loads(history_path.read_text()) if history_path.is_file() else {"passes": []}
    history.update(models=names, model_path=str(model_path), fingerprint=cache.fingerprint)
    history["passes"].append(record)
    history_path.write_text(json.dumps(history, indent=2))


def prepare(models: dict[str, Path], splits: dict[str, list[Example]], output_dir: str | Path,
            scoring: dict[str, Any], batch_size: int, pad_token_id: int,
            build_engine: Callable[[Path], object], train_batch_size: int | None = None,
            chunk_tokens: int = 0, collate: Callable | None = None) -> dict[str, StaticLogps]:
    """Make the cache of each static model complete for ``splits``; return it by model name.

    :param models: static model name (``reference``, ``anchor``) -> checkpoint folder. Models with the
        same folder share one cache, one file and one pre-pass.
    :param scoring: how the run scores (dtype, attention, batch layout: :func:`aligner.recipes.train.scoring`); part of
        the fingerprint, so a cache scored otherwise is not reused.
    :param splits: split name -> its examples (the eval split's batches match :func:`aligner.evaluation.eval.evaluate`'s,
        so a model equal to the policy gives bitwise the policy's eval log-probs).
    :param build_engine: builds the model's (ZeRO-3 partitioned) inference engine; called only when some
        example is missing from the cache, and the engine is dropped before this returns.
    :param train_batch_size: pairs per forward for the ``train`` split (``train.micro_batch_size``), so the
        pre-pass needs no more memory than a training step; other splits use ``batch_size`` (the eval's).
    :param chunk_tokens: ``train.logps_chunk_tokens``, as in the steps (aligner/scoring/logps.py).
    :param collate: the run's batch builder (:func:`aligner.data.make_collate`), so the pre-pass scores the same
        layout (padded, packed, prefix-shared) as the steps; default padded.

    Collective: every rank calls it with the same arguments.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    groups: dict[Path, list[str]] = {}
    for name, path in sorted(models.items()):
        groups.setdefault(Path(path), []).append(name)
    out: dict[str, StaticLogps] = {}
    for model_path, names in groups.items():
        stem = "+".join(names)
        path = cache_dir(output_dir) / f"{stem}.pt"

        def read() -> StaticLogps:
            fp = fingerprint(model_path, scoring)
            cache = load(path, stem, fp, model_path, scoring) if path.exists() else StaticLogps(stem, fp, scoring)
            _check_digests(cache, splits, path)
            return cache

        cache = _on_rank0(read)
        n_total = sum(map(len, splits.values()))
        missing = {s: [ex for ex in exs if (s, ex.id) not in cache.entries] for s, exs in splits.items()}
        n_missing = sum(map(len, missing.values()))
        record: dict = {"computed": n_missing, "reused": n_total - n_missing}
        if n_missing:
            engine = build_engine(model_path)
            for split, examples in missing.items():
                if examples:
                    size = train_batch_size if split == "train" and train_batch_size else batch_size
                    cache.entries.update(_compute(engine, examples, split, size, pad_token_id, chunk_tokens, collate))
            alive = _release(engine)
            del engine
            gc.collect()
            record["engine_released"] = alive() is None
        if rank == 0:
            if n_missing:
                save(cache, path)
            _append_history(path, names, model_path, cache, record)
            log.info("static log-probs of %s (%s): %d computed, %d reused from %s",
                     stem, model_path, n_missing, n_total - n_missing, path)
        if dist.is_initialized():
            dist.barrier()
        for name in names:
            out[name] = cache
    return out
