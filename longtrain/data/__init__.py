"""Data: document sources, tokenizers, packing into fixed-length samples, and a stateful loader."""

from longtrain.data.loader import StatefulLoader
from longtrain.data.packing import PackedDataset, packed_dataset
from longtrain.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "PackedDataset",
    "StatefulLoader",
    "Tokenizer",
    "build_tokenizer",
    "packed_dataset",
]
