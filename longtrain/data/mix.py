"""A stage's data mix: weighted sources with length filters, plus synthetic retrieval.

A source is a prepared corpus (the run's own, or another prepared folder) restricted to
documents whose length lies in [min_doc_tokens, max_doc_tokens], found through the
document index without reading tokens: long code and books upsampled beside short data,
as ProLong (30% code repositories, 30% books, 40% short) and Llama 3 do.
``stage.long_doc_share`` is the one-corpus shorthand: that share from documents of at
least seq_len tokens, the rest from all documents.

Every part is an infinite dataset whose sample ``i`` is a pure function of ``i``; the
mix picks the part for global sample ``i`` from a seeded draw on ``i`` alone, so the
whole stream stays a pure function of the global sample count (what the loader stores).
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
import torch

from pathlib import Path

from longtrain.config import Config, MixSourceConfig, TokenizerConfig
from longtrain.data.packing import PackedDataset, packed_dataset
from longtrain.data.retrieval import Haystack, RetrievalDataset
from longtrain.data.shards import PreparedData, TokenStream
from longtrain.data.tokenizer import Tokenizer


class SampleSource(Protocol):
    def sample(self, i: int) -> dict[str, torch.Tensor]: ...


class MixedDataset:
    def __init__(self, parts: Sequence[tuple[SampleSource, float]], seed: int):
        weights = np.array([w for _, w in parts], dtype=np.float64)
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"mix weights must be >= 0 with a positive sum, got {weights.tolist()}")
        self.parts = [p for p, _ in parts]
        self.cumulative = np.cumsum(weights / weights.sum())
        self.seed = seed

    def part_of(self, i: int) -> int:
        u = np.random.default_rng([self.seed, i]).random()
        return min(int(np.searchsorted(self.cumulative, u, side="right")), len(self.parts) - 1)

    def sample(self, i: int) -> dict[str, torch.Tensor]:
        return self.parts[self.part_of(i)].sample(i)


def source_stream(entry: MixSourceConfig, corpus: PreparedData, tokenizer: TokenizerConfig) -> TokenStream:
    """The train documents of one mix source that pass its length filter."""
    prepared = PreparedData(Path(entry.prepared), tokenizer) if entry.prepared else corpus
    return prepared.stream("train", entry.min_doc_tokens, entry.max_doc_tokens)


def build_train_data(cfg: Config, tokenizer: Tokenizer, corpus: PreparedData) -> PackedDataset | MixedDataset:
    """The stage's training stream: weighted corpus sources plus retrieval samples."""
    s, d = cfg.stage, cfg.data
    text_share = 1.0 - s.retrieval_share
    everything = corpus.stream("train")
    parts: list[tuple[SampleSource, float]] = []
    if s.mix:
        total = sum(e.weight for e in s.mix)
        for entry in s.mix:
            stream = source_stream(entry, corpus, cfg.tokenizer)
            parts.append((packed_dataset(stream, s.seq_len, d), text_share * entry.weight / total))
    else:
        parts.append((packed_dataset(everything, s.seq_len, d), text_share - s.long_doc_share))
        if s.long_doc_share:
            long_docs = corpus.stream("train", min_doc_tokens=s.seq_len)
            parts.append((packed_dataset(long_docs, s.seq_len, d), s.long_doc_share))
    if s.retrieval_share:
        haystack = Haystack.of_stream(everything.haystack_tokens(), tokenizer)
        parts.append((RetrievalDataset(cfg.retrieval, tokenizer, haystack, s.seq_len, d.seed, "train"), s.retrieval_share))
    parts = [(p, w) for p, w in parts if w > 0]
    return parts[0][0] if len(parts) == 1 else MixedDataset(parts, d.seed)
