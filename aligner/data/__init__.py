"""Preference data: loading, validation, tokenization, batching and sampling."""

from aligner.data.batch import Batch, PackedBatch, PaddedBatch, PrefixSharedBatch
from aligner.data.collate import collate_batch, collate_pairs
from aligner.data.load import DataError, load_rows
from aligner.data.packing import make_collate, pack_pairs, pack_prefix_shared, real_tokens
from aligner.data.prepare import prepare_data
from aligner.data.sampler import PairSampler, example_lengths
from aligner.data.tokenize import Example, UnpairedExample, tokenize_dataset

__all__ = ["Batch", "DataError", "Example", "PackedBatch", "PaddedBatch", "PairSampler", "PrefixSharedBatch", "UnpairedExample", "collate_batch",
           "collate_pairs", "example_lengths", "load_rows", "make_collate", "pack_pairs", "pack_prefix_shared", "prepare_data", "real_tokens",
           "tokenize_dataset"]
