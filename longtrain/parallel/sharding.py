"""Zigzag sequence sharding for context parallelism.

The sequence is cut into 2·cp equal chunks and rank r keeps chunks r and 2·cp−1−r.
Under a causal mask an early chunk has little work and a late one a lot, so pairing
them gives every rank the same attention cost (see ring.py for the schedule).
input_ids, labels (shifted before sharding), position ids and document ids all go
through the same permutation, so RoPE sees the *global* positions.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _check(seq_len: int, cp_size: int) -> None:
    if seq_len % (2 * cp_size) != 0:
        raise ValueError(
            f"sequence length {seq_len} must be divisible by 2·cp = {2 * cp_size} (cp={cp_size}) "
            "for zigzag sharding"
        )


def zigzag_shard(x: Tensor, cp_rank: int, cp_size: int, dim: int = 1) -> Tensor:
    """This rank's two chunks of ``x`` along ``dim``, concatenated (local length S/cp)."""
    _check(x.shape[dim], cp_size)
    chunks = x.chunk(2 * cp_size, dim)
    return torch.cat((chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]), dim)


def zigzag_shard_batch(batch: dict[str, Tensor], cp_rank: int, cp_size: int) -> dict[str, Tensor]:
    """This rank's zigzag shard of every [B, T] tensor of a batch (the batch itself at cp = 1)."""
    if cp_size == 1:
        return batch
    return {k: zigzag_shard(v, cp_rank, cp_size, dim=1) for k, v in batch.items()}


def zigzag_unshard(shards: list[Tensor] | Tensor, cp_size: int, dim: int = 1) -> Tensor:
    """Inverse of ``zigzag_shard``: the full sequence from every rank's shard.

    ``shards`` is the list of per-rank shards in rank order, or those shards already
    concatenated along ``dim`` (what an all-gather along the sequence returns).
    """
    gathered = torch.cat(list(shards), dim) if isinstance(shards, (list, tuple)) else shards
    _check(gathered.shape[dim], cp_size)
    # Gathered chunk 2i is global chunk i, gathered chunk 2i+1 is global chunk 2·cp−1−i.
    n = 2 * cp_size
    chunks = gathered.chunk(n, dim)
    source = [2 * j if j < cp_size else 2 * (n - 1 - j) + 1 for j in range(n)]
    return torch.cat([chunks[i] for i in source], dim)


def zigzag_positions(seq_len: int, cp_rank: int, cp_size: int) -> Tensor:
    """Global position ids (int64, length seq_len/cp) of this rank's local tokens."""
    return zigzag_shard(torch.arange(seq_len), cp_rank, cp_size, dim=0)


def document_zigzag_index(doc_ids: Tensor, cp_size: int) -> Tensor:
    """Per-document zigzag: [cp, B, T/cp] sorted sequence positions each rank keeps.

    ``doc_ids`` [B, T] (nondecreasing per row). Every document is cut into 2·cp pieces and
    rank r keeps pieces r and 2·cp−1−r, so every rank gets the same share of every
    document's causal attention work, whatever the document lengths: what zigzag by
    position does for one document, done per document. Pieces differ by at most one
    token; the odd tokens go to the ranks holding the fewest so far, which keeps every
    rank at T/cp tokens (no padding, no divisibility rule on documents).
    """
    _check(doc_ids.shape[1], cp_size)
    rows = [_document_zigzag_row(row.numpy(), cp_size) for row in doc_ids.cpu()]
    return torch.from_numpy(np.stack(rows, axis=1))


def _document_zigzag_row(docs: np.ndarray, cp: int) -> np.ndarray:
    """[cp, T/cp] positions of one row (see ``document_zigzag_index``)."""
    held = np.zeros(cp, dtype=np.int64)
    kept: list[list[np.ndarray]] = [[] for _ in range(cp)]
    edges = np.flatnonzero(np.diff(docs)) + 1
    for start, end in zip(np.concatenate([[0], edges]), np.concatenate([edges, [len(docs)]])):
        base, odd = divmod(int(end - start), 2 * cp)
        extra = np.zeros(cp, dtype=np.int64)
        np.add.at(extra, np.argsort(held, kind="stable")[np.arange(odd) % cp], 1)
        sizes = np.full(2 * cp, base)
        sizes[:cp] += extra >= 1  # a rank's first odd token lengthens its early piece
        sizes[::-1][:cp] += extra >= 2  # a second one its late piece
        cuts = start + np.concatenate([[0], np.cumsum(sizes)])
        for r in range(cp):
            kept[r] += [np.arange(cuts[r], cuts[r + 1]), np.arange(cuts[2 * cp - 1 - r], cuts[2 * cp - r])]
        held += sizes[:cp] + sizes[::-1][:cp]
    return np.stack([np.concatenate(k) for k in kept])
