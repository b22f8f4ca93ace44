"""Fused linear cross-entropy with z-loss, computed in chunks of tokens.

Logits for a long sequence are [T, vocab]: at 128K tokens and a 128K vocab that is 64 GB in
fp32. We never hold them: the output projection, the loss and its gradient are computed
one chunk of tokens at a time, and the gradients with respect to the hidden states and the
output weight are computed right there in the forward (as Liger's fused linear
cross-entropy does), where the chunk's logits already exist. The backward then only scales
them by the incoming gradient. Recomputing each chunk's logits in the backward instead
(checkpointing the loss) costs a fourth pass of the output projection, which at a 32K
vocabulary is most of a small model's FLOPs.

So that the gradient can be formed in the forward, the differentiable output is the loss
itself, ``ce + z_loss · z`` summed over tokens (:attr:`LossSums.objective`); the CE and z
sums come along, detached, for logging.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

IGNORE_INDEX = -100


class LossSums(NamedTuple):
    """Sums over this rank's tokens; divide by the global token count to get means."""

    objective: Tensor  # sum of ce + z_loss·log²Z: the one output gradients flow through
    ce: Tensor  # sum of -log p(label), detached
    z: Tensor  # sum of log²Z (PaLM z-loss term, before its coefficient), detached
    tokens: Tensor  # number of labels that are not IGNORE_INDEX


def _compute_dtype(h: Tensor, weight: Tensor) -> torch.dtype:
    """The matmul dtype the projection would get outside this function: autocast's, if on."""
    device = h.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(h.dtype, weight.dtype)


def _project(h: Tensor, weight: Tensor) -> Tensor:
    """A chunk's logits [chunk, vocab], at least fp32 (bf16 logits: softmax in fp32)."""
    logits = h @ weight.t()
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _exp_in_place(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(exp(logit - m), Σ exp(logit - m), log Z) with the first formed in place of ``logits``.

    log Z = m + log Σ exp(logit - m). The chunk is [chunk, vocab], so every pass over it
    counts (logsumexp would allocate and make two more).
    """
    m = logits.amax(dim=-1, keepdim=True)
    e = logits.sub_(m).exp_()
    sum_e = e.sum(dim=-1)
    return e, sum_e, m.squeeze(1) + sum_e.log()


def _chunk_loss(
    h: Tensor, weight: Tensor, labels: Tensor, z_loss: float, grads: Optional[tuple[Tensor, Tensor]]
) -> tuple[Tensor, Tensor]:
    """CE and z sums of one chunk; with ``grads`` = (dh chunk, dW fp32 accumulator), also
    writes d(ce + z_loss·z)/dh into the first and adds d/dW to the second."""
    logits = _project(h, weight)
    valid = labels != IGNORE_INDEX
    target = labels.clamp_min(0).unsqueeze(1)
    target_logit = logits.gather(1, target).squeeze(1)
    e, sum_e, log_z = _exp_in_place(logits)
    ce = torch.where(valid, log_z - target_logit, 0.0).sum()
    z = torch.where(valid, log_z.square(), 0.0).sum()
    if grads is not None:
        # d/dlogits of (log Z - logit[y]) + z_loss·(log Z)² = softmax·(1 + 2·z_loss·log Z) - onehot(y),
        # zero on ignored tokens; softmax = e / Σe.
        g = e.mul_(torch.where(valid, (1 + 2 * z_loss * log_z) / sum_e, 0.0).unsqueeze(1))
        g.scatter_add_(1, target, -valid.to(g.dtype).unsqueeze(1))
        g = g.to(h.dtype)
        dh, dw = grads
        torch.matmul(g, weight, out=dh)
        if dw.dtype == g.dtype:
            dw.addmm_(g.t(), h)
        else:  # bf16 products, accumulated in fp32
            dw.add_(g.t() @ h)
    return ce, z


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, labels: Tensor, chunk_size: int, z_loss: float, dtype: torch.dtype):
        with torch.autocast(h.device.type, enabled=False):  # the dtype is chosen by the caller
            h_c, w_c = h.to(dtype), weight.to(dtype)
            dh = torch.empty_like(h_c)
            acc = torch.promote_types(dtype, torch.float32)  # fp32, or float64 for a float64 check
            dw = torch.zeros(weight.shape, dtype=acc, device=weight.device)
            ce = z = h.new_zeros((), dtype=acc)
            for start in range(0, h.shape[0], chunk_size):
                sl = slice(start, start + chunk_size)
                c, zc = _chunk_loss(h_c[sl], w_c, labels[sl], z_loss, (dh[sl], dw))
                ce, z = ce + c, z + zc
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = h.dtype, weight.dtype
        ctx.mark_non_differentiable(ce, z)
        return ce + z_loss * z, ce, z

    @staticmethod
    def backward(ctx, grad_objective: Tensor, _grad_ce, _grad_z):
        dh, dw = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (dh * grad_objective).to(h_dtype), (dw * grad_objective).to(w_dtype), None, None, None, None


def chunked_cross_entropy(h: Tensor, weight: Tensor, labels: Tensor, chunk_size: int, z_loss: float = 0.0) -> LossSums:
    """h [B, T, D] final hidden states, weight [vocab, D], labels [B, T]; ``z_loss`` is the
    coefficient of the z-loss term in :attr:`LossSums.objective`."""
    h = h.reshape(-1, h.shape[-1])
    labels = labels.reshape(-1)
    tokens = (labels != IGNORE_INDEX).sum()
    dtype = _compute_dtype(h, weight)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        objective, ce, z = _FusedLinearCrossEntropy.apply(h, weight, labels, chunk_size, z_loss, dtype)
        return LossSums(objective, ce, z, tokens)
    with torch.no_grad():  # evaluation: the sums only
        h_c, w_c = h.to(dtype), weight.to(dtype)
        sums = [_chunk_loss(h_c[s : s + chunk_size], w_c, labels[s : s + chunk_size], z_loss, None)
                for s in range(0, h.shape[0], chunk_size)]
        ce = torch.stack([c for c, _ in sums]).sum()
        z = torch.stack([zc for _, zc in sums]).sum()
    return LossSums(ce + z_loss * z, ce, z, tokens)


class TokenScores(NamedTuple):
    """Per-token results of an evaluation forward, [B, T] like the labels; what the needle
    grid, the task suite and loss by position read instead of logits."""

    loss: Tensor  # -log p(label), fp32 (float64 for a float64 model); 0 where the label is ignored
    argmax: Tensor  # the most likely token (long); IGNORE_INDEX where the label is ignored


def _chunk_scores(h: Tensor, weight: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token CE and argmax of one chunk of labelled tokens (the same log Z as training)."""
    logits = _project(h, weight)
    argmax = logits.argmax(dim=-1)  # before the logits become exp(logit - m) in place
    target_logit = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
    _, _, log_z = _exp_in_place(logits)
    return log_z - target_logit, argmax


@torch.no_grad()
def token_scores(h: Tensor, weight: Tensor, labels: Tensor, chunk_size: int) -> TokenScores:
    """h [B, T, D] final hidden states, weight [vocab, D], labels [B, T] → :class:`TokenScores`.

    Only labelled tokens are projected, ``chunk_size`` at a time: a needle's few answer
    tokens cost a few rows of logits, a whole window of loss by position [chunk, vocab]
    at a time, and [T, vocab] never exists.
    """
    valid = labels != IGNORE_INDEX
    dtype = _compute_dtype(h, weight)
    rows, targets, w_c = h[valid].to(dtype), labels[valid], weight.to(dtype)
    parts = [_chunk_scores(rows[s : s + chunk_size], w_c, targets[s : s + chunk_size])
             for s in range(0, rows.shape[0], chunk_size)]
    loss = torch.zeros(labels.shape, dtype=torch.promote_types(dtype, torch.float32), device=h.device)
    argmax = torch.full_like(labels, IGNORE_INDEX)
    if parts:
        loss[valid] = torch.cat([c for c, _ in parts])
        argmax[valid] = torch.cat([a for _, a in parts])
    return TokenScores(loss, argmax)


def total_loss(sums: LossSums, num_tokens: Tensor | int) -> Tensor:
    """Mean CE + z_loss·mean(log²Z) over ``num_tokens`` (the global count, for sharded runs)."""
    return sums.objective / num_tokens
