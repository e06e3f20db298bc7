"""Save and restore checkpoints atomically, and export the policy in Hugging Face format.

Layout under ``output_dir/checkpoints``::

    step_<N>/            a complete checkpoint (DeepSpeed's ZeRO shards, optimizer and
                         LR-scheduler state, the run's client state, per-rank RNG files,
                         plugins' per-rank folders, and ``aligner_checkpoint.json``)
    latest               the tag of the newest complete checkpoint (DeepSpeed's format)
    .tmp-step_<N>/       a save in progress; never read, removed by the next save

A save is atomic: every rank writes into ``.tmp-step_<N>/step_<N>``, then rank 0
writes ``aligner_checkpoint.json`` (the completion marker), renames the folder to
``step_<N>`` (one atomic ``rename`` on a POSIX file system), and only then updates
``latest`` and prunes old checkpoints (``train.keep_last``). A process killed at
any point leaves the previous checkpoints as they were.

Verified: the marker also records, under ``files``, the size and an xxh3-128 digest
(:data:`DIGEST`) of every file the checkpoint holds, computed by the ranks in
parallel right after writing, from the page cache. ``--resume`` verifies them
before anything is loaded (:func:`verify`, again split over the ranks): a missing,
extra, resized or altered file names itself. ``--resume auto`` then falls back to
the newest checkpoint that verifies, with a warning; ``--resume <dir>`` is refused.
xxh3 was chosen over BLAKE2b by measurement (``benchmarks/checkpoint_digest.py``):
it is not a cryptographic hash, so it guards against a bad disk or an interrupted
copy, not against someone who edits a checkpoint on purpose (see the trust boundary).

Trust boundary: DeepSpeed reads its own ``*.pt`` files with
``torch.load(weights_only=False)`` (deepspeed 0.19.8,
``runtime/checkpoint_engine/torch_checkpoint_engine.py``), i.e. with pickle, so a
checkpoint folder runs code when loaded: resume only from checkpoints that your own
runs wrote. What aligner itself reads is JSON or ``torch.load(weights_only=True)``,
and the JSON marker is checked before DeepSpeed opens any file.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import resource
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

TAG = re.compile(r"^step_(\d+)$")
#: The digest of each checkpoint file in the marker (``files``): xxhash's 128-bit XXH3, ~10x BLAKE2b's speed here.
DIGEST = "xxh3_128"
#: Bytes read at a time when a file is digested.
READ_BYTES = 1 << 23
MARKER = "aligner_checkpoint.json"
LATEST = "latest"
log = logging.getLogger("aligner")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or does not fit this run; the message says which and what to do."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def is_complete(folder: Path) -> bool:
    return TAG.match(folder.name) is not None and (folder / MARKER).is_file()


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (published with their marker), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := TAG.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint ``--resume auto`` takes: the newest complete one.

    That is the one ``latest`` names, or a newer one when the process died
    between publishing it and updating ``latest``.
    """
    found = list_checkpoints(output_dir)
    pointer = checkpoint_root(output_dir) / LATEST
    if found and pointer.is_file() and pointer.read_text().strip() != found[-1].name:
        log.warning("%s names %s but %s is complete and newer; resuming from it", pointer, pointer.read_text().strip(), found[-1].name)
    return found[-1] if found else None


def read_meta(folder: Path) -> dict[str, Any]:
    """The marker of a complete checkpoint: step, model, plugins, world size, architecture."""
    if not folder.is_dir():
        raise CheckpointError(f"--resume {folder}: no such checkpoint folder; use --resume auto or a checkpoints/step_<N> folder")
    if not is_complete(folder):
        raise CheckpointError(
            f"--resume {folder}: not a complete aligner checkpoint (no {MARKER}: the save was interrupted, or the "
            f"folder is not a checkpoints/step_<N> folder); use --resume auto to take the newest complete one"
        )
    try:
        meta = json.loads((folder / MARKER).read_text())
    except ValueError as exc:
        raise CheckpointError(f"--resume {folder}: its {MARKER} is not valid JSON ({exc}); the checkpoint is damaged. "
                              f"Resume from another one (--resume auto takes the newest that verifies)") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"--resume {folder}: its {MARKER} holds no mapping; the checkpoint is damaged")
    return meta


def file_digest(path: Path) -> str:
    """``xxh3_128:<hex>`` of the file's bytes, read in :data:`READ_BYTES` blocks into one reused buffer."""
    import xxhash

    h = xxhash.xxh3_128()
    buffer = bytearray(READ_BYTES)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            h.update(view[:n])
    return f"{DIGEST}:{h.hexdigest()}"


def _files(folder: Path) -> list[str]:
    """Every file of a checkpoint folder but its marker, as sorted paths relative to the folder."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MARKER
                  and not (p.parent == folder and p.name.startswith(f".{MARKER}")))


def _from_rank_zero(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (collective when there are several)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gathered(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (collective when there are several)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def record_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Collective: the size and digest of every file in ``folder`` (rank 0 lists them, each rank digests its share)."""
    rank, world = _rank_world()
    names = _from_rank_zero(_files(folder) if rank == 0 else None)
    mine = {name: {"size": (folder / name).stat().st_size, "digest": file_digest(folder / name)}
            for name in names[rank::world]}
    return {name: entry for part in _gathered(mine) for name, entry in part.items()}


def verify(folder: Path, meta: dict[str, Any]) -> str | None:
    """Collective: None when ``folder`` holds exactly the files its marker records, each of the recorded size and
    digest; else the first problem, naming the file. A marker without ``files`` (written before aligner recorded
    them) cannot be verified: None, with a warning."""
    recorded = meta.get("files")
    if recorded is None:
        if _rank_world()[0] == 0:
            log.warning("checkpoint %s records no file digests (written by an older aligner); resuming from it "
                        "without verifying its files", folder)
        return None
    rank, world = _rank_world()
    problems: list[tuple[str, str]] = []
    if rank == 0:
        problems += [(name, f"an extra file {folder / name}, which the checkpoint did not hold when it was saved")
                     for name in _files(folder) if name not in recorded]
    for name in sorted(recorded)[rank::world]:
        path, entry = folder / name, recorded[name]
        if not path.is_file():
            problems.append((name, f"its file {path} is missing"))
        elif path.stat().st_size != entry["size"]:
            problems.append((name, f"its file {path} has {path.stat().st_size:,} bytes, {entry['size']:,} when saved "
                                   f"(truncated or overwritten)"))
        elif file_digest(path) != entry["digest"]:
            problems.append((name, f"its file {path} does not match its digest ({entry['digest'].split(':')[0]}): "
                                   f"its bytes changed since the save"))
    found = sorted(p for part in _gathered(problems) for p in part)
    return found[0][1] if found else None


def verified_resume(folder: Path, auto: bool, output_dir: str | Path) -> Path:
    """Collective: the checkpoint to resume from, verified (:func:`verify`).

    ``auto`` (``--resume auto``, ``folder`` the newest complete checkpoint): a checkpoint that does not verify is
    skipped with a warning, for the newest older one that does. Otherwise (``--resume <dir>``) it is refused.
    """
    if not auto:
        problem = verify(folder, read_meta(folder))
        if problem is not None:
            raise CheckpointError(f"--resume {folder}: the checkpoint is damaged: {problem}. Resume from another "
                                  f"checkpoint (--resume auto takes the newest one that verifies)")
        return folder
    candidates = [p for p in reversed(list_checkpoints(output_dir)) if int(TAG.match(p.name).group(1))
                  <= int(TAG.match(folder.name).group(1))]
    skipped = []
    for candidate in _from_rank_zero(candidates):
        meta, problem = _from_rank_zero(_read_meta_or_problem(candidate) if _rank_world()[0] == 0 else None)
        if problem is None:
            problem = verify(candidate, meta)
        if problem is None:
            if skipped and _rank_world()[0] == 0:
                log.warning("--resume auto: resuming from %s, the newest checkpoint that verifies", candidate)
            return candidate
        skipped.append(f"{candidate.name}: {problem}")
        if _rank_world()[0] == 0:
            log.warning("--resume auto: checkpoint %s is damaged (%s); trying the one before it", candidate, problem)
    raise CheckpointError(f"--resume auto: no checkpoint in {checkpoint_root(output_dir)} verifies ({'; '.join(skipped)}). "
                          f"Restore them from a copy, or start afresh with --overwrite")


def _read_meta_or_problem(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    try:
        return read_meta(folder), None
    except CheckpointError as exc:
        return None, str(exc).removeprefix(f"--resume {folder}: ")


def check_compatible(folder: Path, meta: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse a checkpoint written by a run with another model, plugin set, ZeRO layout or world size."""
    fixes = {
        "model": "resume with the same model.name_or_path, or start afresh with --overwrite",
        "architecture": "this checkpoint holds another model's weights; resume with the model it was trained from",
        "plugins": "resume with the same --plugins (their states are in the checkpoint), or start afresh with --overwrite",
        "lora": "a LoRA checkpoint holds adapters and a full one all weights: resume with the model.lora section "
                "of the run that wrote it (or null for a full run), or start afresh with --overwrite",
        "world_size": "resume with the same number of ranks (ZeRO shards are per rank)",
        "zero_stage": "resume with the same train.zero_stage",
        "sequence_parallel": "resume with the same train.sequence_parallel (the sampler's position counts the "
                             "data-parallel groups' micro-batches)",
    }
    defaults = {"sequence_parallel": 1}  # checkpoints written before the key existed
    for key, fix in fixes.items():
        saved = meta.get(key, defaults.get(key))
        if key in expected and saved != expected[key]:
            raise CheckpointError(
                f"checkpoint {folder} was written with {key} = {saved!r}, this run has {expected[key]!r}; {fix}"
            )


def architecture(model_config) -> dict[str, Any]:
    """What must match for a checkpoint's shards to fit: the shape-defining keys of a Hugging Face model config."""
    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")
    return {k: getattr(model_config, k, None) for k in keys}


def rng_state() -> dict[str, Any]:
    """Every random generator a step may draw from: Python's, NumPy's, torch's CPU and accelerator ones."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` to disk, so a rename cannot publish unwritten data."""
    for path in sorted(folder.rglob("*"), reverse=True) + [folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine, output_dir: str | Path, step: int, client_state: dict[str, Any],
         write_extra: Callable[[Path], None] | None = None, meta: dict[str, Any] | None = None,
         keep_last: int = 0, rng: dict[str, Any] | None = None, trainable_only: bool = False) -> Path:
    """Write ``checkpoints/step_<step>`` atomically on every rank (a collective call).

    ``trainable_only`` (``model.lora``): the engine's shards hold only the parameters that train (the adapters,
    their optimizer state); the frozen base is the model's own checkpoint and is not copied.

    ``write_extra(folder)`` runs on every rank after the engine's shards are
    written, into the unpublished folder (``aligner_save_checkpoint``). ``meta``
    goes into the marker (see :func:`check_compatible`). ``keep_last`` > 0
    removes all but the newest ``keep_last`` checkpoints once the new one is published.
    ``rng`` is this rank's RNG state to store (default: the current one).
    """
    rank, world = _rank_world()
    started = time.perf_counter()
    root = checkpoint_root(output_dir)
    tag = f"step_{step}"
    staging = root / f".tmp-{tag}"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # left by a save that was killed
        staging.mkdir(parents=True)
    _barrier()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over a file-size limit: a failed write (EFBIG), not a killed rank
    folder = staging / tag
    failure = _write_shards(engine, folder, client_state, rng or rng_state(), write_extra, trainable_only)
    _raise_if_any_write_failed(failure and describe_write_failure(failure, staging, engine, output_dir), staging, output_dir)
    digest_started = time.perf_counter()
    files = record_files(folder)  # before the rename: what each rank wrote is still in its page cache
    digest_s = time.perf_counter() - digest_started
    if rank == 0:
        _fsync_tree(folder)
        marker = {"step": step, "world_size": world, **(meta or {}), "files": files}
        _write_atomically(folder / MARKER, json.dumps(marker, indent=2, sort_keys=True))
        final = root / tag
        if final.exists():  # an older save of the same step (a rerun after a stop): replace it
            shutil.rmtree(final)
        os.rename(folder, final)
        _write_atomically(root / LATEST, tag)
        log.info("saved checkpoint %s: %s bytes (%.1f MiB) in %.2f s, of which %.2f s digesting its %d files",
                 final, f"{tree_bytes(final):,}", tree_bytes(final) / 2**20, time.perf_counter() - started, digest_s,
                 len(files))
        shutil.rmtree(staging, ignore_errors=True)
        if keep_last > 0:
            for old in list_checkpoints(output_dir)[:-keep_last]:
                shutil.rmtree(old)
    _barrier()
    return root / tag


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, a file-size limit); nothing was published."""


class _WriteFailed(OSError):
    """A file of a checkpoint could not be written (``filename`` says which)."""


def _write_shards(engine, folder: Path, client_state: dict[str, Any], rng: dict[str, Any],
                  write_extra: Callable[[Path], None] | None, trainable_only: bool = False) -> BaseException | None:
    """This rank's part of a save into the unpublished ``folder``; the write error, if one happened.

    DeepSpeed's save runs collectives between its file writes, so a rank whose write
    fails must not leave it early: its checkpoint engine's ``save`` is wrapped for the
    call to record the first failure (torch.save reports a short write as a RuntimeError)
    and skip the rest, and the save goes on in step with the other ranks.
    """
    failures: list[BaseException] = []
    ckpt_engine = engine.checkpoint_engine
    write = ckpt_engine.save

    def save_or_record(state_dict, path, *args, **kwargs):
        if failures:
            return None
        try:
            return write(state_dict, path, *args, **kwargs)
        except (OSError, RuntimeError) as exc:
            failures.append(_WriteFailed(exc.errno if isinstance(exc, OSError) else None, _first_line(exc), str(path)))
            return None

    ckpt_engine.save = save_or_record
    try:
        engine.save_checkpoint(str(folder.parent), tag=folder.name, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=trainable_only)
    except OSError as exc:  # a write outside the checkpoint engine (a folder, the recovery script)
        _barrier()  # the one DeepSpeed's save ends with, which this rank skipped; a lost peer fails here
        return exc
    finally:
        del ckpt_engine.save  # the class's own method again
    if failures:
        return failures[0]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(rng, folder / f"rng_rank{_rank_world()[0]}.pt")
        if write_extra is not None:
            write_extra(folder)
    except (OSError, RuntimeError) as exc:
        return exc
    return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def tree_bytes(folder: Path) -> int:
    """The bytes of every file under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def expected_bytes(engine, output_dir: str | Path) -> int:
    """What a checkpoint of this run takes: the newest complete one's size, else about 16 bytes per parameter
    (fp32 master weights, two Adam moments, and the weights)."""
    found = list_checkpoints(output_dir)
    if found:
        return tree_bytes(found[-1])
    return 16 * sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())


def describe_write_failure(exc: BaseException, staging: Path, engine, output_dir: str | Path) -> str:
    """One line: which rank failed where, why, the space and limit it had, and the bytes a checkpoint needs."""
    rank, _ = _rank_world()
    first = exc.strerror if isinstance(exc, OSError) and exc.strerror else _first_line(exc)
    where = getattr(exc, "filename", None) or staging
    free = shutil.disk_usage(staging if staging.exists() else staging.parent).free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    limit_text = "none" if limit == resource.RLIM_INFINITY else f"{limit:,} bytes"
    return (f"rank {rank} could not write {where} ({first}); that file system has {free:,} bytes free and this "
            f"process's file-size limit (ulimit -f) is {limit_text}; a checkpoint of this run needs about "
            f"{expected_bytes(engine, output_dir):,} bytes")


def _raise_if_any_write_failed(message: str | None, staging: Path, output_dir: str | Path) -> None:
    """Agree across ranks on whether the save failed; if so, drop the staging folder and raise on every rank."""
    messages = [message]
    if dist.is_initialized() and dist.get_world_size() > 1:
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, message)
    failed = [m for m in messages if m]
    if not failed:
        return
    if _rank_world()[0] == 0:
        shutil.rmtree(staging, ignore_errors=True)
    latest = latest_checkpoint(output_dir)
    kept = (f"the last complete checkpoint, {latest}, is intact and --resume auto takes it" if latest
            else "no checkpoint was published yet")
    raise CheckpointWriteError(
        f"checkpoint {staging.name.removeprefix('.tmp-')} was not saved: {failed[0]}. Nothing of it was published: "
        f"{kept}. Free space in {checkpoint_root(output_dir)} (or raise the limit, or move output_dir), then rerun "
        f"with --resume auto"
    )


def load(engine, checkpoint_dir: Path, trainable_only: bool = False) -> dict[str, Any]:
    """Restore engine (weights, optimizer, scheduler) and this rank's RNG from a checkpoint; return its client state.

    ``trainable_only``: the checkpoint was saved so (``model.lora``); the frozen weights stay as loaded.
    """
    rank, _ = _rank_world()
    path, client_state = engine.load_checkpoint(str(checkpoint_dir.parent), tag=checkpoint_dir.name,
                                                load_module_strict=not trainable_only)
    if path is None:
        raise CheckpointError(f"--resume: {checkpoint_dir} is not a readable DeepSpeed checkpoint")
    rng_file = checkpoint_dir / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        client_state["rng"] = torch.load(rng_file, weights_only=True)
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
