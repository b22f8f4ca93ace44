"""Ulysses context parallelism, alone or under the zigzag ring (hybrid).

The model's inputs are zigzag-sharded over the whole cp group (``parallel/sharding.py``):
cp rank p holds chunks p and 2·cp−1−p of 2·cp. Ulysses trades sequence shards for head
shards with all-to-alls over a group of U ranks: each rank sends head slice u of its
q/k/v to rank u and gets back, for its Hq/U query heads (and the matching K/V heads),
every group rank's tokens. Those pieces are zigzag chunk pairs; put in order (first
halves in rank order, second halves in reverse, ``zigzag_unshard``) they are the
group's tokens in global order. Attention runs on them and the output goes back the
same way (``zigzag_shard`` per rank, then the inverse all-to-all).

- ``ulysses`` (U = cp): the group holds the whole sequence, so attention is one local
  causal kernel call, or under document masking the whole sequence's rectangles.
- ``hybrid`` (cp = U × R): cp ranks jU..jU+U−1 form Ulysses group j, ranks with the same
  u form a ring group of R ranks. With p = jU + u, Ulysses group j holds fine chunks
  jU..jU+U−1 and their mirrors, which are exactly coarse chunks j and 2R−1−j of a zigzag
  over R: after the all-to-all a rank holds ring rank j's zigzag shard of the sequence
  for its heads, and the zigzag ring (``ring.py``) runs over the ring group unchanged,
  document masking and block skipping included. The model's sharding stays plain zigzag.

GQA: the K/V heads are split like the query heads when U divides Hkv. When U > Hkv
(U % Hkv == 0), each K/V head is replicated U/Hkv times before the all-to-all (head i
of the replicas is head i // (U/Hkv), so query head h still meets kv head
h // (Hq/Hkv)) and the gradients of the replicas are summed back.

Communication per rank and layer (all-to-alls in the compute dtype, each rank sending
(U−1)/U of every tensor): forward q, k, v (k/v after replication) and out back;
backward dout in and dq, dk, dv back. The hybrid's ring adds its own P2P on top.

Document plans: the trainer registers ``DocumentLayout.zigzag(doc_ids, ring_rank, R)``
(R = 1 for ``ulysses``) under the model's local doc ids (``layout.py``): the plan of the
ring-local tokens the kernels see, so attention reads no doc id from the device and
gathers none. Without a registered plan the doc ids are gathered and planned here.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from longtrain.attention.documents import check_doc_ids
from longtrain.attention.kernels import accum_dtype, check_inputs
from longtrain.attention.layout import DocumentLayout, gather_shards, layout_for, registered_layout
from longtrain.attention.ring import (
    empty_seq_major, group_arg, resolve_group, ring_backward_planned, ring_forward_planned,
)
from longtrain.parallel.sharding import zigzag_shard, zigzag_unshard

HeadSide = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]  # q, k, v, out, lse of this rank's heads


def check_heads(n_heads: int, n_kv_heads: int, degree: int) -> None:
    """Ulysses of ``degree`` U needs U | Hq, and U | Hkv or Hkv | U (K/V replicated)."""
    if n_heads % degree or (n_kv_heads % degree and degree % n_kv_heads):
        raise ValueError(
            f"Ulysses degree {degree} needs n_heads={n_heads} divisible by it and n_kv_heads={n_kv_heads} "
            "dividing it or divisible by it"
        )


def _replicate(kv: Tensor, degree: int) -> Tensor:
    """K or V with each head repeated so that there are ``degree`` of them (at least Hkv)."""
    return kv.repeat_interleave(degree // kv.shape[1], dim=1) if degree > kv.shape[1] else kv


def _sum_replicas(grad: Tensor, kv_heads: int) -> Tensor:
    """dK or dV of the ``kv_heads`` heads from those of their replicas (``_replicate``)."""
    B, H, L, D = grad.shape
    if H == kv_heads:
        return grad
    summed = grad.unflatten(1, (kv_heads, H // kv_heads)).sum(2, dtype=accum_dtype(grad.dtype))
    return empty_seq_major(grad, (B, kv_heads, L, D)).copy_(summed)


def _all_to_all(sends: list[list[Tensor]], group: dist.ProcessGroup) -> list[list[Tensor]]:
    """Each tensor's all-to-all (piece u to group rank u), all posted before any is awaited."""
    received = [[torch.empty_like(piece) for piece in pieces] for pieces in sends]
    works = [dist.all_to_all(recv, pieces, group=group, async_op=True) for recv, pieces in zip(received, sends)]
    for work in works:
        work.wait()
    return received


def _to_heads(xs: list[Tensor], group: dist.ProcessGroup) -> list[Tensor]:
    """Local zigzag shards [B, H, 2c, D] → this rank's H/U heads of the group's tokens in
    global order, [B, H/U, 2cU, D] contiguous."""
    size = dist.get_world_size(group)
    sends = [[piece.contiguous() for piece in x.chunk(size, dim=1)] for x in xs]
    return [zigzag_unshard(pieces, size, dim=2) for pieces in _all_to_all(sends, group)]


def _to_sequence(xs: list[Tensor], group: dist.ProcessGroup) -> list[Tensor]:
    """Inverse of ``_to_heads``: [B, H/U, 2cU, D] → the local shard [B, H, 2c, D], laid out
    as [B, 2c, H, D] (``empty_seq_major``)."""
    size = dist.get_world_size(group)
    sends = [[zigzag_shard(x, u, size, dim=2) for u in range(size)] for x in xs]
    shards = []
    for x, pieces in zip(xs, _all_to_all(sends, group)):
        B, H, L, D = x.shape
        shard = empty_seq_major(x, (B, H * size, L // size, D))
        for heads, piece in zip(shard.chunk(size, dim=1), pieces):
            heads.copy_(piece)
        shards.append(shard)
    return shards


def _layout(
    doc_ids: Optional[Tensor], ulysses: dist.ProcessGroup, ring: Optional[dist.ProcessGroup]
) -> Optional[DocumentLayout]:
    """The document plan of the tokens attention sees (the ring group's zigzag shard), or None."""
    if doc_ids is None:
        return None
    ring_size = 1 if ring is None else dist.get_world_size(ring)
    layout = registered_layout(doc_ids)
    if layout is not None:
        if len(layout.steps) != ring_size:  # a plan for another method's tokens would mask the wrong pairs
            raise ValueError(
                f"the registered document layout plans {len(layout.steps)} ring steps, the ring has {ring_size}: "
                "register DocumentLayout.zigzag(doc_ids, dims.ring_rank, dims.ring_size)"
            )
        return layout
    return layout_for(zigzag_unshard(gather_shards(doc_ids, ulysses), dist.get_world_size(ulysses), dim=1), ring)


def ulysses_forward(
    q: Tensor, k: Tensor, v: Tensor, scale: float, ulysses: dist.ProcessGroup,
    ring: Optional[dist.ProcessGroup] = None, doc_ids: Optional[Tensor] = None,
) -> tuple[Tensor, HeadSide]:
    """(out, head side): causal attention of the local zigzag shard over the sequence.

    q [B, Hq, 2c, D], k/v [B, Hkv, 2c, D] (the shard over the whole cp group), ``ring``
    None for plain Ulysses. out is this rank's rows [B, Hq, 2c, D]; the head side (q, k,
    v, out, lse of this rank's heads over the ring-local tokens) is what the backward
    needs. No autograd; see ``ulysses_attention``.
    """
    check_inputs(q=q, k=k, v=v)  # before replication and the all-to-all
    degree = dist.get_world_size(ulysses)
    layout = _layout(doc_ids, ulysses, ring)
    q_h, k_h, v_h = _to_heads([q, _replicate(k, degree), _replicate(v, degree)], ulysses)
    out_h, lse_h = ring_forward_planned(q_h, k_h, v_h, scale, ring, layout)
    (out,) = _to_sequence([out_h], ulysses)
    return out, (q_h, k_h, v_h, out_h.contiguous(), lse_h.contiguous())


def ulysses_backward(
    dout: Tensor, head_side: HeadSide, scale: float, ulysses: dist.ProcessGroup,
    ring: Optional[dist.ProcessGroup], doc_ids: Optional[Tensor], kv_heads: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of the local shard, from ``ulysses_forward``'s head side; ``kv_heads``
    is the model's Hkv (before replication)."""
    (dout_h,) = _to_heads([dout], ulysses)
    grads = ring_backward_planned(dout_h, *head_side, scale, ring, _layout(doc_ids, ulysses, ring))
    dq, dk, dv = _to_sequence(list(grads), ulysses)
    return dq, _sum_replicas(dk, kv_heads), _sum_replicas(dv, kv_heads)


# A custom op like ring.py's, for the same reasons: activation checkpointing's policy saves
# its outputs, so a recomputed block never reruns the all-to-alls, and torch.compile traces
# through it. The head side is among the outputs because an op's autograd may save only its
# inputs and outputs: the backward then needs no all-to-all of q, k, v or out again.
@torch.library.custom_op("longtrain::ulysses_attention", mutates_args=())
def _ulysses_op(
    q: Tensor, k: Tensor, v: Tensor, scale: float, ulysses: str, ring: Optional[str], doc_ids: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    out, head_side = ulysses_forward(q, k, v, scale, resolve_group(ulysses), resolve_group(ring), doc_ids)
    return out, *head_side


@_ulysses_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, scale: float, ulysses: str, ring: Optional[str], doc_ids: Optional[Tensor]):
    degree = dist.get_world_size(resolve_group(ulysses))
    B, H, L, D = q.shape
    heads, kv_heads, T, Dv = H // degree, max(k.shape[1], degree) // degree, L * degree, v.shape[-1]
    return (
        empty_seq_major(q, (B, H, L, Dv)),
        q.new_empty((B, heads, T, D)), k.new_empty((B, kv_heads, T, D)), v.new_empty((B, kv_heads, T, Dv)),
        q.new_empty((B, heads, T, Dv)), q.new_empty((B, heads, T), dtype=accum_dtype(q.dtype)),
    )


def _setup_context(ctx, inputs: tuple, output: tuple[Tensor, ...]) -> None:
    _, k, _, scale, ulysses, ring, doc_ids = inputs
    ctx.save_for_backward(*output[1:])
    ctx.scale, ctx.groups, ctx.doc_ids, ctx.kv_heads = scale, (ulysses, ring), doc_ids, k.shape[1]
    ctx.mark_non_differentiable(*output[1:])


@torch.library.custom_op("longtrain::ulysses_attention_backward", mutates_args=())
def _ulysses_backward_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
    ulysses: str, ring: Optional[str], doc_ids: Optional[Tensor], kv_heads: int,
) -> tuple[Tensor, Tensor, Tensor]:
    # q..lse are the head side; dout needs no dense_last_dim: the all-to-all copies it.
    return ulysses_backward(dout, (q, k, v, out, lse), scale, resolve_group(ulysses), resolve_group(ring), doc_ids, kv_heads)


@_ulysses_backward_op.register_fake
def _(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
      ulysses: str, ring: Optional[str], doc_ids: Optional[Tensor], kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    B, H, L, _ = dout.shape
    return (
        empty_seq_major(q, (B, H, L, q.shape[-1])),
        empty_seq_major(k, (B, kv_heads, L, k.shape[-1])),
        empty_seq_major(v, (B, kv_heads, L, v.shape[-1])),
    )


def _backward(ctx, dout: Tensor, *_: Optional[Tensor]) -> tuple[Tensor | None, ...]:
    grads = _ulysses_backward_op(dout, *ctx.saved_tensors, ctx.scale, *ctx.groups, ctx.doc_ids, ctx.kv_heads)
    return *grads, None, None, None, None


_ulysses_op.register_autograd(_backward, setup_context=_setup_context)
ULYSSES_ATTENTION_OP = torch.ops.longtrain.ulysses_attention.default


def ulysses_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, ulysses_group: dist.ProcessGroup,
    ring_group: Optional[dist.ProcessGroup] = None, doc_ids: Optional[Tensor] = None,
) -> Tensor:
    """Differentiable causal attention over a zigzag-sharded sequence, by Ulysses over
    ``ulysses_group`` and, when given, the zigzag ring over ``ring_group`` (module doc).

    Same contract as ``ring_attention``: q [B, Hq, 2c, D], k/v [B, Hkv, 2c, D] and
    ``doc_ids`` [B, 2c] are this rank's zigzag shard over the cp group; returns this
    rank's rows of the output, [B, Hq, 2c, D].
    """
    check_heads(q.shape[1], k.shape[1], dist.get_world_size(ulysses_group))
    if doc_ids is not None:
        check_doc_ids(q, doc_ids)
    return _ulysses_op(q, k, v, scale, ulysses_group.group_name, group_arg(ring_group), doc_ids)[0]
