"""A stage's data mix: long documents upsampled, short ones kept, synthetic retrieval added.

Every part is an infinite dataset whose sample ``i`` is a pure function of ``i``; the
mix picks the part for global sample ``i`` from a seeded draw on ``i`` alone, so the
whole stream stays a pure function of the global sample count (what the loader stores).
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
import torch

from longtrain.config import Config
from longtrain.data.packing import PackedDataset, pack_documents
from longtrain.data.retrieval import Haystack, RetrievalDataset
from longtrain.data.sources import load_documents
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


def long_documents(tokens: np.ndarray, doc_starts: np.ndarray, min_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """The sub-stream of documents (BOS … EOS) at least ``min_tokens`` long."""
    ends = np.append(doc_starts[1:], len(tokens))
    keep = np.flatnonzero(ends - doc_starts >= min_tokens)
    if len(keep) == 0:
        raise ValueError(f"no document has at least {min_tokens} tokens; lower stage.long_doc_share to 0")
    pieces = [tokens[doc_starts[k] : ends[k]] for k in keep]
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    return np.concatenate(pieces), np.concatenate([[0], np.cumsum(lengths[:-1])])


def build_train_data(cfg: Config, tokenizer: Tokenizer) -> PackedDataset | MixedDataset:
    """The stage's training stream: the packed corpus, plus long documents and retrieval samples."""
    s, seed = cfg.stage, cfg.data.seed
    tokens, doc_starts = pack_documents(load_documents(cfg.data, "train"), tokenizer, seed)
    corpus = PackedDataset(tokens, doc_starts, s.seq_len, seed, cfg.data.reset_positions)
    if not s.long_doc_share and not s.retrieval_share:
        return corpus
    parts: list[tuple[SampleSource, float]] = [(corpus, 1.0 - s.long_doc_share - s.retrieval_share)]
    if s.long_doc_share:
        long_docs = long_documents(tokens, doc_starts, s.seq_len)
        parts.append((PackedDataset(*long_docs, s.seq_len, seed, cfg.data.reset_positions), s.long_doc_share))
    if s.retrieval_share:
        haystack = Haystack.of_stream(tokens, tokenizer)  # the stream packed above, not packed again
        parts.append((RetrievalDataset(cfg.retrieval, tokenizer, haystack, s.seq_len, seed, "train"), s.retrieval_share))
    return MixedDataset(parts, seed)
