"""Load a preference dataset through HF ``datasets``: a file, a dataset folder, or the embedded task."""

from __future__ import annotations

from pathlib import Path

import datasets

from aligner.data import synthetic

EMBEDDED = "embedded:"
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """A dataset or one of its rows is wrong; the message names the file, row and column."""


def load_rows(spec: str) -> datasets.Dataset:
    """Load ``spec``: ``embedded:train``/``embedded:eval``, a jsonl/json/parquet/csv/arrow file,
    or a folder written by ``Dataset.save_to_disk`` (a ``DatasetDict`` must have a ``train`` split)."""
    if spec.startswith(EMBEDDED):
        split = spec[len(EMBEDDED):]
        if split not in synthetic.SPLIT_SIZES:
            raise DataError(f"unknown embedded dataset '{spec}'; use embedded:train or embedded:eval")
        return datasets.Dataset.from_list(synthetic.make_rows(split))
    path = Path(spec)
    if not path.exists():
        raise DataError(f"dataset {spec} does not exist; give a jsonl/json/parquet/arrow file or a datasets folder")
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if "train" not in loaded:
                    raise DataError(f"dataset folder {spec} holds splits {list(loaded)}; save one split, or name it 'train'")
                loaded = loaded["train"]
            return loaded
        if path.suffix == ".arrow":
            return datasets.Dataset.from_file(str(path))
        builder = FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise DataError(f"dataset {spec}: unknown file type '{path.suffix}'; use .jsonl, .json, .parquet, .csv or .arrow")
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types for unreadable files
        raise DataError(f"dataset {spec} cannot be read: {type(exc).__name__}: {exc}") from exc
