"""The on-disk cache of tokenized splits, and the split type the trainer reads from it.

A tokenized split is stored as flat ``int32`` arrays of token ids with ``int64``
offsets, one pair per sequence column (``prompt``, ``chosen``, ``rejected`` or
``completion``), the example ids (json) and, for unpaired data, the labels.
Opening it memory-maps the arrays, so a warm start reads nothing it does not
use; an example becomes lists of ints only when the trainer asks for it.

Entries live under ``$ALIGNER_CACHE/tokenized/<key>`` (default
``~/.cache/aligner``), written to a temporary folder and renamed, so a killed
writer leaves no half entry. The key (:mod:`aligner.data.prepare`) covers the
data, the tokenizer, the chat template and the length settings.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aligner.data.tokenize import Example, UnpairedExample

FORMAT = 1  # bump when the layout changes
PAIRED_SEQS = ("prompt", "chosen", "rejected")
UNPAIRED_SEQS = ("prompt", "completion")


def cache_root() -> Path:
    from aligner.data import embedded

    return embedded.cache_root() / "tokenized"


class TokenizedSplit(Sequence):
    """Examples of one split, built on access from the cached arrays (optionally a subset of rows)."""

    def __init__(self, folder: Path, indices: np.ndarray | None = None):
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        self.paired = bool(self.meta["paired"])
        self.ids = json.loads((folder / "ids.json").read_text())
        self.seqs = {name: (np.load(folder / f"{name}.values.npy", mmap_mode="r"),
                            np.load(folder / f"{name}.offsets.npy")) for name in self.columns}
        self.labels = None if self.paired else np.load(folder / "labels.npy")
        self.indices = np.arange(len(self.ids)) if indices is None else np.asarray(indices)

    @property
    def columns(self) -> tuple[str, ...]:
        return PAIRED_SEQS if self.paired else UNPAIRED_SEQS

    def __len__(self) -> int:
        return len(self.indices)

    def _seq(self, name: str, row: int) -> list[int]:
        values, offsets = self.seqs[name]
        return values[offsets[row]:offsets[row + 1]].tolist()

    def _example(self, row: int) -> Example | UnpairedExample:
        if self.paired:
            return Example(self.ids[row], *(self._seq(n, row) for n in PAIRED_SEQS))
        return UnpairedExample(self.ids[row], self._seq("prompt", row), self._seq("completion", row), bool(self.labels[row]))

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self._example(int(r)) for r in self.indices[i]]
        return self._example(int(self.indices[i]))

    def subset(self, indices: np.ndarray) -> "TokenizedSplit":
        """The rows at ``indices`` (positions in this split)."""
        return TokenizedSplit(self.folder, self.indices[np.asarray(indices, dtype=np.int64)])


def _flat(lists: Any) -> tuple[np.ndarray, np.ndarray]:
    """A pyarrow list column (or python lists) as (int32 values, int64 offsets)."""
    import pyarrow as pa

    column = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else pa.array(lists, type=pa.list_(pa.int32()))
    column = column.cast(pa.large_list(pa.int32()))
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.values.to_numpy(zero_copy_only=False).astype(np.int32)
    return values[offsets[0]:offsets[-1]], offsets - offsets[0]


def write(key: str, paired: bool, columns: dict[str, Any], ids: list[str], labels: Any, meta: dict) -> Path:
    """Publish one tokenized split under its key; ``columns`` maps each sequence name to its list column."""
    target = cache_root() / key
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=target.parent))
    try:
        for name in (PAIRED_SEQS if paired else UNPAIRED_SEQS):
            values, offsets = _flat(columns[name])
            np.save(tmp / f"{name}.values.npy", values)
            np.save(tmp / f"{name}.offsets.npy", offsets)
        if not paired:
            np.save(tmp / "labels.npy", np.asarray(labels, dtype=bool))
        (tmp / "ids.json").write_text(json.dumps(ids))
        (tmp / "meta.json").write_text(json.dumps({**meta, "paired": paired, "format": FORMAT, "rows": len(ids)}))
        os.rename(tmp, target)
    except OSError:
        if not (target / "meta.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process published the same key first
    return target


def lookup(key: str) -> TokenizedSplit | None:
    """The cached split for ``key``, or None."""
    folder = cache_root() / key
    if not (folder / "meta.json").is_file():
        return None
    return TokenizedSplit(folder)
