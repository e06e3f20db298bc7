"""Load a preference dataset through HF ``datasets``: a file, a folder, a Hub dataset ID, or the embedded task.

A dataset is named by:

- ``embedded:train`` / ``embedded:eval``: the embedded sort task;
- a local file: ``.jsonl``, ``.json``, ``.parquet``, ``.csv``, ``.arrow``;
- a local folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
- a local dataset repository folder (data files named by split, as on the Hub, e.g.
  ``data/train_prefs-00000-of-00001.parquet``, or a README with ``configs:``), read by ``load_dataset``;
- a Hub dataset ID (``HuggingFaceH4/ultrafeedback_binarized``), read by ``load_dataset`` through the HF cache;
  with ``HF_HUB_OFFLINE=1`` only what is cached can be read.

``split`` picks a split (default ``train``) and ``subset`` the configuration (``load_dataset``'s ``name``);
an unknown one is refused with the list of those that exist. In error messages rows count from 0
(``dataset[0]`` is row 0) and lines of a file from 1, as editors number them.
"""

from __future__ import annotations

import codecs
import json
import os
from pathlib import Path

import datasets

from aligner.data import synthetic

EMBEDDED = "embedded:"
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """A dataset or one of its rows is wrong; the message names the file, row and column."""


def load_rows(spec: str, split: str | None = None, subset: str | None = None, default_split: str = "train",
              keys: tuple[str, str] = ("split", "subset")) -> datasets.Dataset:
    """Load one split of ``spec`` (see the module doc) as a ``datasets.Dataset``.

    ``split`` / ``subset`` ``None``: not given (a dataset with splits gives ``default_split``). Given for a dataset
    that has neither (a single file, the embedded task, a saved ``Dataset``), they are refused rather than ignored
    (but for the split ``train``, the one such a dataset is);
    ``keys`` names them in that message (e.g. ``data.train_split``, ``data.subset``).
    """
    if spec.startswith(EMBEDDED):
        name = spec[len(EMBEDDED):]
        if name not in synthetic.SPLIT_SIZES:
            raise DataError(f"unknown embedded dataset '{spec}'; use embedded:train or embedded:eval")
        _refuse_unused(spec, "the embedded task", split, subset, keys)
        return datasets.Dataset.from_list(synthetic.make_rows(name))
    path = Path(spec)
    if path.is_file():
        _refuse_unused(spec, "a single file", split, subset, keys)
        return _load_file(path, spec)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        if not isinstance(loaded, datasets.DatasetDict):
            _refuse_unused(spec, "one saved Dataset", split, subset, keys)
        elif subset is not None:
            _refuse_unused(spec, "a saved DatasetDict", None, subset, keys)
        return _pick_split(loaded, spec, split, default_split)
    if path.is_dir() or _looks_like_hub_id(spec):
        return _load_repository(spec, split, subset, local=path.is_dir(), default_split=default_split)
    raise DataError(f"dataset {spec} does not exist; give a jsonl/json/parquet/csv/arrow file, a dataset folder, "
                    f"or a Hub dataset ID such as HuggingFaceH4/ultrafeedback_binarized")


def _refuse_unused(spec: str, kind: str, split: str | None, subset: str | None, keys: tuple[str, str]) -> None:
    """A split or subset named for a dataset that has none would be ignored, and the run would train on all of it
    (``train`` is the one split a single file has: that name is fine)."""
    if split is not None and split != "train":
        raise DataError(f"{keys[0]}={split!r}: dataset {spec} is {kind}, with no splits to choose from, so the whole "
                        f"of it would be read; remove {keys[0]}, or point at a dataset folder or Hub ID that has "
                        f"the split '{split}'")
    if subset is not None:
        raise DataError(f"{keys[1]}={subset!r}: dataset {spec} is {kind}, with no subsets to choose from, so the whole "
                        f"of it would be read; remove {keys[1]}, or name the subset in a mixture entry of the dataset "
                        f"that has it (e.g. data.train: [{{path: org/name, subset: {subset}}}, {{path: {spec}}}])")


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~")) and Path(spec).suffix not in FILE_BUILDERS


def _pick_split(loaded, spec: str, split: str | None, default_split: str = "train"):
    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    name = split or default_split
    if name not in loaded:
        key = "the split" if split else f"no split given, and there is no '{default_split}' split;"
        raise DataError(f"dataset {spec}: {key} '{name}' does not exist; its splits are {', '.join(loaded)}. "
                        f"Set data.train_split / data.eval_split (or 'split' in a data.train entry)")
    return loaded[name]


def _load_repository(spec: str, split: str | None, subset: str | None, local: bool,
                     default_split: str = "train") -> datasets.Dataset:
    """A Hub dataset or a local repository folder through ``load_dataset``; unknown subsets and splits listed."""
    try:
        loaded = datasets.load_dataset(spec, name=subset)
    except ValueError as exc:
        if "BuilderConfig" in str(exc) or "Config name" in str(exc) or "config" in str(exc).lower():
            names = _config_names(spec)
            raise DataError(f"dataset {spec}: the subset {subset!r} does not exist; its subsets are "
                            f"{', '.join(names) if names else '(none listed)'}. Set data.subset to one of them") from None
        raise DataError(f"dataset {spec} cannot be read: {exc}") from None
    except Exception as exc:  # datasets raises many types for a missing or unreachable dataset
        if not local and _offline():
            raise DataError(
                f"dataset {spec} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading "
                f"it. Fetch it on a machine with network: `hf download --repo-type dataset {spec}` (or run "
                f"once without HF_HUB_OFFLINE), or give a local file or folder"
            ) from None
        raise DataError(f"dataset {spec} cannot be read: {type(exc).__name__}: {exc}") from None
    return _pick_split(loaded, spec, split, default_split)


def _config_names(spec: str) -> list[str]:
    try:
        return list(datasets.get_dataset_config_names(spec))
    except Exception:  # listing is best-effort: the refusal stands either way
        return []


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _load_file(path: Path, spec: str) -> datasets.Dataset:
    if path.suffix == ".arrow":
        return datasets.Dataset.from_file(str(path))
    builder = FILE_BUILDERS.get(path.suffix)
    if builder is None:
        raise DataError(f"dataset {spec}: unknown file type '{path.suffix}'; use .jsonl, .json, .parquet, .csv or .arrow")
    if path.stat().st_size == 0:
        raise DataError(f"dataset {spec} is empty (0 bytes); write one row per line, or point data.train at another file")
    if path.suffix == ".jsonl":
        check_utf8(path, spec)  # pyarrow's JSON reader would silently replace bad bytes
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for unreadable files
        if path.suffix == ".jsonl":
            diagnose_jsonl(path, spec)
        raise DataError(f"dataset {spec} cannot be read: {type(exc).__name__}: {exc}") from None


def check_utf8(path: Path, spec: str, chunk: int = 1 << 24) -> None:
    """Refuse a file that is not valid UTF-8, naming the line (C-speed incremental decode; ~1 GB/s)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with path.open("rb") as f:
        try:
            while block := f.read(chunk):
                decoder.decode(block)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            diagnose_jsonl(path, spec)
            raise DataError(f"dataset {spec}: the file ends inside a UTF-8 character; re-save it as UTF-8") from None


def diagnose_jsonl(path: Path, spec: str) -> None:
    """Name the first line of a jsonl file that is not UTF-8 or not one JSON object (lines count from 1)."""
    with path.open("rb") as f:
        rows = 0
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"dataset {spec}, line {number} (row {rows}): bytes {raw[exc.start:exc.start + 4]!r} "
                                f"at byte {exc.start} of the line are not valid UTF-8; re-save the file as UTF-8") from None
            if not text.strip():
                continue
            line = text.rstrip("\r\n")  # the line ending is not part of the JSON: columns count on this line only
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                where = "the end of the line" if exc.pos >= len(line) else f"column {exc.colno}"
                raise DataError(f"dataset {spec}, line {number} (row {rows}): not valid JSON ({exc.msg.removesuffix(' at')} "
                                f"at {where}); the line may be truncated. Fix or remove that line") from None
            if not isinstance(value, dict):
                raise DataError(f"dataset {spec}, line {number} (row {rows}): a JSON {type(value).__name__}, "
                                f"expected one object per line like {{\"prompt\": ..., \"chosen\": ..., \"rejected\": ...}}")
            rows += 1
    if rows == 0:
        raise DataError(f"dataset {spec} has no rows (only blank lines); write one JSON object per line")
