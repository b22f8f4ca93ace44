"""Chunked cross-entropy with z-loss.

Logits for a long sequence are [T, vocab]: at 128K tokens and a 128K vocab that is 64 GB in
fp32. We compute the loss chunk by chunk and recompute each chunk's logits in backward
(activation checkpointing), so at most [chunk, vocab] logits exist at any time.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


class LossSums(NamedTuple):
    """Sums over this rank's tokens; divide by the global token count to get means."""

    ce: Tensor  # sum of -log p(label)
    z: Tensor  # sum of log²Z (PaLM z-loss term, before its coefficient)
    tokens: Tensor  # number of labels that are not IGNORE_INDEX


def _chunk_sums(h: Tensor, weight: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    logits = (h @ weight.t()).float()
    log_z = torch.logsumexp(logits, dim=-1)
    valid = labels != IGNORE_INDEX
    target = logits.gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1)
    ce = torch.where(valid, log_z - target, 0.0).sum()
    z = torch.where(valid, log_z.square(), 0.0).sum()
    return ce, z


def chunked_cross_entropy(h: Tensor, weight: Tensor, labels: Tensor, chunk_size: int) -> LossSums:
    """h [B, T, D] final hidden states, weight [vocab, D], labels [B, T]."""
    h = h.reshape(-1, h.shape[-1])
    labels = labels.reshape(-1)
    ce = z = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        c, zc = checkpoint(_chunk_sums, h[sl], weight, labels[sl], use_reentrant=False)
        ce, z = ce + c, z + zc
    return LossSums(ce, z, (labels != IGNORE_INDEX).sum())


def total_loss(sums: LossSums, z_loss: float, num_tokens: Tensor | int) -> Tensor:
    """Mean CE + z_loss·mean(log²Z) over ``num_tokens`` (the global count, for sharded runs)."""
    return (sums.ce + z_loss * sums.z) / num_tokens
