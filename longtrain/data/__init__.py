"""Data: document sources, tokenizers, packing into fixed-length samples, and a stateful loader."""

from longtrain.data.loader import StatefulLoader
from longtrain.data.packing import PackedDataset, build_packed_dataset, pack_documents
from longtrain.data.sources import load_documents
from longtrain.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "PackedDataset",
    "StatefulLoader",
    "Tokenizer",
    "build_packed_dataset",
    "build_tokenizer",
    "load_documents",
    "pack_documents",
]
