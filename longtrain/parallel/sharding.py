"""Zigzag sequence sharding for context parallelism.

The sequence is cut into 2·cp equal chunks and rank r keeps chunks r and 2·cp−1−r.
Under a causal mask an early chunk has little work and a late one a lot, so pairing
them gives every rank the same attention cost (see ring.py for the schedule).
input_ids, labels (shifted before sharding), position ids and document ids all go
through the same permutation, so RoPE sees the *global* positions.
"""

from __future__ import annotations

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
