"""Serve fixed-length training samples from a packed token stream.

The stream is ``BOS doc EOS BOS doc EOS ...`` (a prepared split read through memory maps,
``shards.TokenStream``, or any array). It is cut into windows of ``seq_len + 1`` tokens that overlap by one
token (stride ``seq_len``), so every token is a label exactly once per epoch. Sample ``i``
is a pure function of ``i``: window ``perm_e[i mod n]`` with a fresh permutation for each
epoch ``e = i // n``. The stream is therefore infinite, and a loader only has to remember
how many samples it has consumed.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from longtrain.config import DataConfig
from longtrain.data.shards import TokenStream


class PackedDataset:
    """Fixed-length samples cut from a packed token stream.

    Each sample holds LongTensors of length ``seq_len``: ``input_ids``, ``labels``
    (input_ids shifted by one), ``position_ids`` and ``doc_ids``. Documents are packed
    back to back. ``doc_ids`` numbers the documents within the window (0 for the first,
    +1 at each BOS); the model masks attention by them under ``data.document_masking``.
    Positions run 0..seq_len-1 across document boundaries, or with ``reset_positions``
    restart at 0 at each BOS (the window's first, partial document counts from the
    window start, so no position exceeds seq_len-1).
    """

    def __init__(
        self, tokens: np.ndarray | TokenStream, doc_starts: np.ndarray, seq_len: int, seed: int, reset_positions: bool = False
    ):
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"the token stream has {len(tokens)} tokens, fewer than seq_len+1={seq_len + 1}; "
                "use more documents or a shorter seq_len"
            )
        self.tokens = tokens
        self.doc_starts = np.asarray(doc_starts, dtype=np.int64)
        self.seq_len = seq_len
        self.seed = seed
        self.reset_positions = reset_positions
        self._num_windows = (len(tokens) - 1) // seq_len
        # One epoch's permutation is reused by every sample of that epoch.
        self._perm_epoch: Optional[int] = None
        self._perm = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        """Windows per epoch."""
        return self._num_windows

    def _window(self, i: int) -> int:
        epoch, k = divmod(i, self._num_windows)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self._num_windows)
            self._perm_epoch = epoch
        return int(self._perm[k])

    def sample(self, i: int) -> dict[str, torch.Tensor]:
        """Global sample ``i`` (any i >= 0; epochs wrap around with a new order)."""
        if i < 0:
            raise IndexError(f"sample index must be >= 0, got {i}")
        start = self._window(i) * self.seq_len
        window = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
        offsets = np.arange(start, start + self.seq_len)
        # Number of BOS strictly after the window start and at or before each position.
        first = np.searchsorted(self.doc_starts, start, side="right")
        doc_ids = torch.from_numpy(np.searchsorted(self.doc_starts, offsets, side="right") - first)
        return {
            "input_ids": window[:-1],
            "labels": window[1:],
            "position_ids": document_positions(doc_ids) if self.reset_positions else torch.arange(self.seq_len),
            "doc_ids": doc_ids,
        }


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 where ``doc_ids`` [T] (nondecreasing) steps."""
    index = torch.arange(len(doc_ids))
    starts = torch.ones(len(doc_ids), dtype=torch.bool)
    starts[1:] = doc_ids[1:] != doc_ids[:-1]
    # Each token's document starts at the last start at or before it.
    return index - torch.cummax(torch.where(starts, index, 0), dim=0).values


def packed_dataset(stream: TokenStream, seq_len: int, data_cfg: DataConfig) -> PackedDataset:
    """Training samples of ``seq_len`` cut from a prepared token stream."""
    return PackedDataset(stream, stream.doc_starts, seq_len, data_cfg.seed, data_cfg.reset_positions)
