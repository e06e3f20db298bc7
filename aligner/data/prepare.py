"""The run's data, once per run: load -> format -> tokenize -> cache (:func:`prepare_data`).

- ``data.train`` / ``data.eval`` name one dataset (see :mod:`aligner.data.load`) or a
  mixture: a list of ``{path, split, subset, samples, columns}`` entries. ``samples`` is a
  row count (``5000``) or a fraction (``0.25``) drawn with ``train.seed``; without it every
  row is used. The mixture's rows are tokenized source by source and concatenated; example
  ids become ``<source index>/<id>`` so that they stay unique.
- ``data.eval_fraction`` carves a deterministic share of the train rows (a permutation
  seeded by ``train.seed``) as the eval split, for datasets with no eval split.
- Rank 0 tokenizes, with batched fast-tokenizer calls through ``datasets.map`` (parallel
  workers on ``data.num_proc`` processes, a progress bar), and writes the result to the
  on-disk cache (:mod:`aligner.data.cache`); the other ranks wait and read it
  (:func:`aligner.distributed.lockstep.leaders_first`). A later run or a resume with the same data,
  tokenizer, chat template (and ``data.chat_template_kwargs``) and length settings reads the cache and
  tokenizes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np

from aligner.data import cache
from aligner.data.formats import TEMPLATE_COLUMNS, RowError, column_mapping, detect_paired
from aligner.data.load import DataError, load_rows
from aligner.data.tokenize import BATCH_ROWS, Encoded, check_ids, encode_rows, keep_rows, report, row_ids
from aligner.distributed.lockstep import leaders_first

log = logging.getLogger(__name__)
VERSION = 2  # bump when tokenization changes, so that stale cache entries are not reused
SOURCE_KEYS = ("path", "split", "subset", "samples", "columns")
#: The columns a row's tokens are made from (with :data:`aligner.data.formats.TEMPLATE_COLUMNS`).
READ_COLUMNS = ("prompt", "chosen", "rejected", "completion", "label")
#: Below this many rows one process tokenizes (starting workers costs more than it saves).
PARALLEL_MIN_ROWS = 10_000


@dataclass(frozen=True)
class Source:
    """One dataset of a split: where it is, which split/subset, how many rows, how its columns are named.

    ``split`` / ``subset`` ``None``: not given (``default_split`` is read where there are splits); ``keys`` are the
    config keys they came from, for the message that refuses them on a dataset without splits or subsets.
    """

    path: str
    split: str | None
    subset: str | None
    samples: float | None
    columns: dict | None
    default_split: str = "train"
    keys: tuple[str, str] = ("data.train_split", "data.subset")

    @property
    def label(self) -> str:
        split = self.split or self.default_split
        return self.path if split == "train" or self.split is None else f"{self.path} [{split}]"


def sources(spec: Any, split: str | None, subset: str | None, columns: dict | None, key: str) -> list[Source]:
    """The sources of ``data.train`` / ``data.eval``: one name, or a list of mixture entries.

    ``split``: ``data.train_split`` / ``data.eval_split`` (``None``: the ``train`` / ``test`` split where there are splits).
    """
    default_split, split_key = ("test", "data.eval_split") if key == "data.eval" else ("train", "data.train_split")
    if isinstance(spec, str):
        return [Source(spec, split, subset, None, columns, default_split, (split_key, "data.subset"))]
    out = []
    for i, entry in enumerate(spec):
        if isinstance(entry, str):
            entry = {"path": entry}
        unknown = [k for k in entry if k not in SOURCE_KEYS]
        if "path" not in entry or unknown:
            raise DataError(f"{key}[{i}]: {'unknown key(s) ' + ', '.join(unknown) if unknown else 'no path'}; a "
                            f"mixture entry has {', '.join(SOURCE_KEYS)} (path required), e.g. {{path: org/name, samples: 0.5}}")
        samples = entry.get("samples")
        if samples is not None and (isinstance(samples, bool) or not isinstance(samples, (int, float)) or samples <= 0
                                    or (isinstance(samples, float) and samples > 1)):
            raise DataError(f"{key}[{i}].samples: {samples!r}; give a row count (an integer >= 1) or a fraction in (0, 1]")
        keys = (f"{key}[{i}].split" if "split" in entry else split_key,
                f"{key}[{i}].subset" if "subset" in entry else "data.subset")
        out.append(Source(entry["path"], entry.get("split", split), entry.get("subset", subset), samples,
                          entry.get("columns", columns), default_split, keys))
    if not out:
        raise DataError(f"{key} is an empty list; name a dataset, or list mixture entries")
    return out


def load_source(src: Source, seed: int) -> datasets.Dataset:
    """Load a source, rename its columns by ``columns`` and draw its ``samples``."""
    rows = load_rows(src.path, src.split, src.subset, src.default_split, src.keys)
    rename = column_mapping(src.columns, list(rows.column_names), src.label)
    if rename:
        rows = rows.select_columns(list(rename)).rename_columns(rename)
    if src.samples is not None:
        n = len(rows)
        count = int(src.samples) if isinstance(src.samples, int) else max(1, round(src.samples * n))
        if count > n:
            raise DataError(f"dataset {src.label}: samples={count} but it has only {n} rows; ask for fewer, or a fraction")
        rows = rows.shuffle(seed=seed).select(range(count))
    return rows


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What decides the token ids: the tokenizer's full JSON (fast tokenizers), its special tokens, its template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else datasets.fingerprint.Hasher.hash(tokenizer)
    extra = json.dumps([type(tokenizer).__name__, tokenizer.eos_token, tokenizer.bos_token,
                        getattr(tokenizer, "chat_template", None)], default=str)
    return hashlib.sha256((body + extra).encode()).hexdigest()


def data_fingerprint(rows: datasets.Dataset) -> str:
    """datasets' own fingerprint for cached (file-backed) data; a hash of the rows for in-memory data."""
    if rows.cache_files:
        return rows._fingerprint
    return datasets.fingerprint.Hasher.hash(rows.data.table)


def _encode_batch(batch: dict[str, list], indices: list[int], tokenizer: Any, paired: bool, max_length: int,
                  max_prompt_length: int | None, template_kwargs: dict | None = None) -> dict[str, list]:
    """``datasets.map`` function: one batch of rows -> token-id columns, with an error column for bad rows."""
    n = len(indices)
    rows = [{k: batch[k][i] for k in batch} for i in range(n)]
    encoded = encode_rows(rows, tokenizer, paired, max_length, max_prompt_length, template_kwargs)
    names = ("chosen", "rejected") if paired else ("completion",)
    out: dict[str, list] = {"prompt": [], **{name: [] for name in names}, "label": [], "truncated": [],
                            "error_column": [], "error": []}
    for e in encoded:
        ok = isinstance(e, Encoded)
        out["prompt"].append(e.prompt_ids if ok else [])
        for j, name in enumerate(names):
            out[name].append(e.responses[j] if ok else [])
        out["label"].append(bool(e.label) if ok and e.label is not None else False)
        out["truncated"].append(bool(ok and e.truncated))
        out["error_column"].append("" if ok else e.column)
        out["error"].append("" if ok else e.problem)
    return out


def tokenize_source(rows: datasets.Dataset, label: str, tokenizer: Any, paired: bool, data_cfg: Any) -> dict[str, Any]:
    """Tokenize one source in parallel batches; returns its kept columns, ids, labels and counts."""
    num_proc = data_cfg.num_proc if data_cfg.num_proc is not None else (
        min(os.cpu_count() or 1, 8) if len(rows) >= PARALLEL_MIN_ROWS else None)
    ids = row_ids(rows["id"] if "id" in rows.column_names else None, len(rows))
    rows = rows.select_columns([c for c in rows.column_names if c in (*READ_COLUMNS, *TEMPLATE_COLUMNS)])
    mapped = rows.map(
        _encode_batch, batched=True, batch_size=BATCH_ROWS, with_indices=True, remove_columns=rows.column_names,
        num_proc=num_proc if num_proc and num_proc > 1 else None, desc=f"aligner: tokenizing {label}",
        fn_kwargs={"tokenizer": tokenizer, "paired": paired, "max_length": data_cfg.max_length,
                   "max_prompt_length": data_cfg.max_prompt_length, "template_kwargs": data_cfg.chat_template_kwargs},
        new_fingerprint=hashlib.sha256(f"{data_fingerprint(rows)}{label}".encode()).hexdigest()[:16],
        load_from_cache_file=False, keep_in_memory=True,
    )
    table = mapped.data.table
    errors, columns = table.column("error").to_pylist(), table.column("error_column").to_pylist()
    encoded = [RowError(c, e) if e else None for c, e in zip(columns, errors)]
    keep, skipped = keep_rows(encoded, label, data_cfg.on_bad_row)
    check_ids(ids, keep, label, data_cfg.on_bad_row)
    kept = table.filter(np.asarray(keep)) if not all(keep) else table
    n_truncated = int(np.asarray(kept.column("truncated").to_numpy(zero_copy_only=False)).sum())
    report(label, skipped, n_truncated, kept.num_rows, data_cfg.max_length)
    names = cache.PAIRED_SEQS if paired else cache.UNPAIRED_SEQS
    return {"columns": {n: kept.column(n) for n in names}, "ids": [i for i, ok in zip(ids, keep) if ok],
            "labels": kept.column("label").to_numpy(zero_copy_only=False), "skipped": sum(skipped.values())}


def _concat_columns(parts: list[dict[str, Any]], paired: bool) -> tuple[dict[str, Any], list[str], Any]:
    import pyarrow as pa

    names = cache.PAIRED_SEQS if paired else cache.UNPAIRED_SEQS
    if len(parts) == 1:
        return parts[0]["columns"], parts[0]["ids"], parts[0]["labels"]
    columns = {n: pa.chunked_array([c for p in parts for c in p["columns"][n].chunks]) for n in names}
    ids = [f"{i}/{example_id}" for i, p in enumerate(parts) for example_id in p["ids"]]
    return columns, ids, np.concatenate([np.asarray(p["labels"]) for p in parts])


def prepare_split(srcs: list[Source], tokenizer: Any, data_cfg: Any, seed: int, key_name: str) -> cache.TokenizedSplit:
    """One split, from the cache when its key is there, else tokenized and cached."""
    loaded = [load_source(s, seed) for s in srcs]
    kinds = {s.label: detect_paired(list(rows.column_names), f"{key_name} ({s.label})") for s, rows in zip(srcs, loaded)}
    if len(set(kinds.values())) > 1:
        described = ", ".join(f"{k}: {'paired' if v else 'unpaired'}" for k, v in kinds.items())
        raise DataError(f"{key_name} mixes paired and unpaired datasets ({described}); mix datasets of one kind")
    paired = next(iter(kinds.values()))
    key = hashlib.sha256(json.dumps({
        "version": VERSION, "data": [data_fingerprint(r) for r in loaded], "sources": [s.__dict__ for s in srcs],
        "seed": seed if any(s.samples is not None for s in srcs) else None, "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": data_cfg.max_length, "max_prompt_length": data_cfg.max_prompt_length,
        "on_bad_row": data_cfg.on_bad_row, "chat_template_kwargs": data_cfg.chat_template_kwargs}, sort_keys=True, default=str).encode()).hexdigest()[:32]
    found = cache.lookup(key)
    if found is not None:
        log.info("%s: %d tokenized rows from the cache %s", key_name, len(found), found.folder)
        return found
    parts = [tokenize_source(rows, f"{key_name} ({s.label})", tokenizer, paired, data_cfg) for s, rows in zip(srcs, loaded)]
    columns, ids, labels = _concat_columns(parts, paired)
    folder = cache.write(key, paired, columns, ids, labels, {"split": key_name, "skipped": sum(p["skipped"] for p in parts)})
    log.info("%s: tokenized %d rows into the cache %s", key_name, len(ids), folder)
    return cache.TokenizedSplit(folder)


def carve_eval(train: cache.TokenizedSplit, fraction: float, seed: int) -> tuple[cache.TokenizedSplit, cache.TokenizedSplit]:
    """A deterministic held-out share of train: the first ``fraction`` of a permutation seeded by ``seed``."""
    n = len(train)
    n_eval = max(1, round(fraction * n))
    if n_eval >= n:
        raise DataError(f"data.eval_fraction={fraction} leaves no training rows out of {n}; use a smaller fraction")
    order = np.random.default_rng(seed).permutation(n)
    return train.subset(np.sort(order[n_eval:])), train.subset(np.sort(order[:n_eval]))


def prepare_data(cfg: Any, tokenizer: Any) -> tuple[cache.TokenizedSplit, cache.TokenizedSplit | list]:
    """The train and eval splits of a run; rank 0 tokenizes and caches first, the other ranks then read."""
    d = cfg.data

    def work():
        train = prepare_split(sources(d.train, d.train_split, d.subset, d.columns, "data.train"), tokenizer, d,
                              cfg.train.seed, "data.train")
        if d.eval_fraction:
            return carve_eval(train, d.eval_fraction, cfg.train.seed)
        if not d.eval:
            return train, []
        return train, prepare_split(sources(d.eval, d.eval_split, d.subset, d.columns, "data.eval"), tokenizer, d,
                                    cfg.train.seed, "data.eval")

    return leaders_first(work)
