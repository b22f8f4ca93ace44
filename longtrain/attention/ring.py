"""Zigzag ring attention: causal attention over a sequence sharded across a cp group.

Each rank holds two chunks of the sequence (see ``parallel/sharding.py``): local q/k/v
of length 2c are global chunks [r, 2·cp−1−r]. K/V blocks travel round the ring
(send to r+1, receive from r−1); at step s rank r holds the block of src = (r − s) mod cp
and computes only what the causal mask keeps:

- s = 0, own block: all local q × all local k, causal on local indices (global positions
  increase with the local index, so the local triangle is the global one).
- src < r: both local chunks come after chunk src and before chunk 2·cp−1−src, so all
  local q attend to the block's first half, unmasked.
- src > r: only the local second chunk comes after both block chunks, so q[c:] attends
  to the whole block, unmasked.

q, k, v share one dtype (the run's compute dtype; see ``kernels``), checked before K and
V are stacked into the one message each hop sends, so under bf16 autocast the ring sends
bf16 K/V and every block runs the bf16 flash kernel.

Every rank does 2c² work per step. Partial results are merged in fp32 through their
logsumexp. The backward replays the same schedule with the *global* out/lse
(``kernel_backward``); dK/dV accumulators travel with their K/V block and arrive home
after the last hop. Only the Hkv heads are communicated. Each step posts the next
block's transfer before computing the current one, so communication overlaps compute.

Document masking (``doc_ids``): the schedule is unchanged; each block is cut at document
boundaries into per-document kernel calls (``documents.py``), and a block whose keys
share no document with the rows costs no kernel call. Every rank still posts the same
transfers, so the ring stays in step. Documents need no padding and no length rule.
Where the cuts are is planned on the host once per micro-batch (``layout.py``), so
neither the forward nor the backward reads doc ids from the device or gathers them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.distributed_c10d import _resolve_process_group

from longtrain.attention.documents import (
    BlockPlan, check_doc_ids, document_backward, document_backward_into, document_forward,
)
from longtrain.attention.kernels import accum_dtype, check_inputs, dense_last_dim, kernel_backward, kernel_forward
from longtrain.attention.layout import DocumentLayout, layout_for, ring_block

_KV_TAG, _DKV_TAG = 0, 1  # backward has both streams in flight between the same pair


@dataclass
class _Transfer:
    works: list[dist.Work]
    received: Tensor

    def wait(self) -> Tensor:
        for work in self.works:
            work.wait()
        return self.received


class _Ring:
    """Neighbour exchange in a cp group that may be a sub-group of the world."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        # P2P takes global ranks; the cp group of a dp×cp mesh does not start at 0.
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def exchange(self, send: Tensor, tag: int) -> _Transfer:
        """Post send(send → next) and recv(prev →) without blocking; every rank calls this
        at the same points, so all sends have matching receives and the ring cannot lock."""
        received = torch.empty_like(send)
        if send.is_cuda:
            # NCCL: a send and a recv with the same peer (cp = 2) must be one group call.
            works = dist.batch_isend_irecv([
                dist.P2POp(dist.isend, send, self.next, self.group, tag),
                dist.P2POp(dist.irecv, received, self.prev, self.group, tag),
            ])
        else:
            # Gloo: batch_isend_irecv can hang; plain isend/irecv progress on wait().
            works = [
                dist.isend(send, self.next, self.group, tag),
                dist.irecv(received, self.prev, self.group, tag),
            ]
        return _Transfer(works, received)


def _merge(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    """Fold one block's (out, lse) into the running ones, in place.

    Sigmoid form of out = (e^lse·out + e^lse_b·out_b) / (e^lse + e^lse_b): no exp of a
    large lse, which overflowed in the naive log(1 + exp(Δ)) form elsewhere.
    """
    # out − σ(lse_b − lse)·(out − out_b), as one in-place lerp: no block-sized temporaries.
    out.lerp_(block_out.to(out.dtype), torch.sigmoid(block_lse - lse).unsqueeze(-1))
    lse.sub_(F.logsigmoid(lse - block_lse))


def _check(**tensors: Tensor) -> None:
    # Before K and V are stacked into one message: stack would promote mixed dtypes
    # (fp32 K with bf16 V gives fp32 attention and twice the traffic) instead of failing.
    check_inputs(**tensors)
    q = tensors["q"]
    if q.shape[2] % 2:
        raise ValueError(f"zigzag local length must be even (two chunks), got {q.shape[2]}")


def _block_forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, plan: Optional[BlockPlan]
) -> tuple[Tensor, Tensor]:
    if plan is None:
        return kernel_forward(q, k, v, causal, scale)
    return document_forward(q, k, v, plan, causal, scale)


def _block_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float,
    grads: tuple[Tensor, Tensor, Tensor], plan: Optional[BlockPlan],
) -> None:
    if plan is None:
        kernel_backward(dout, q, k, v, out, lse, causal, scale, grads=grads)
    else:
        document_backward_into(dout, q, k, v, out, lse, plan, causal, scale, grads)


def _steps(layout: Optional[DocumentLayout], ring: _Ring, c: int) -> list[tuple[slice, slice, bool, Optional[BlockPlan]]]:
    """Each ring step's (rows, keys, causal, document plan): the zigzag schedule without
    masking, else the micro-batch's layout (``layout.py``), which may shard by documents."""
    if layout is None:
        return [(*ring_block(step, ring.rank, ring.size, c), None) for step in range(ring.size)]
    return [(s.rows, s.keys, s.causal, s.plan) for s in layout.steps]


def _layout(doc_ids: Optional[Tensor], group: Optional[dist.ProcessGroup]) -> Optional[DocumentLayout]:
    return None if doc_ids is None else layout_for(doc_ids, group)


def ring_forward(
    q: Tensor, k: Tensor, v: Tensor, scale: float, group: Optional[dist.ProcessGroup], doc_ids: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """Causal attention of the local zigzag shard over the whole sequence: (out, lse).

    q [B, Hq, 2c, D], k/v [B, Hkv, 2c, D]; out in q's dtype, lse [B, Hq, 2c] fp32 (fp64
    for fp64 inputs). With ``doc_ids`` (this shard's [B, 2c]) attention stays within
    documents (``documents.py``). ``group`` None: the whole sequence is local, one kernel
    call. No autograd; see ``ring_attention``.
    """
    return ring_forward_planned(q, k, v, scale, group, _layout(doc_ids, group))


def ring_forward_planned(
    q: Tensor, k: Tensor, v: Tensor, scale: float, group: Optional[dist.ProcessGroup], layout: Optional[DocumentLayout]
) -> tuple[Tensor, Tensor]:
    """``ring_forward`` with the document plan already found (None: no masking): Ulysses
    hands the ring tokens whose doc ids are not the model's (``ulysses.py``)."""
    if group is None or dist.get_world_size(group) == 1:  # the kernels check their own inputs
        return _block_forward(q, k, v, True, scale, None if layout is None else layout.steps[0].plan)
    _check(q=q, k=k, v=v)
    ring = _Ring(group)
    c, acc = q.shape[2] // 2, accum_dtype(q.dtype)
    kv = torch.stack((k, v))  # one message per hop
    for step, (rows, keys, causal, plan) in enumerate(_steps(layout, ring, c)):
        transfer = ring.exchange(kv, _KV_TAG) if step + 1 < ring.size else None
        block = kv[:, :, :, keys]  # [2, B, Hkv, keys, D]
        block_out, block_lse = _block_forward(q[:, :, rows], block[0], block[1], causal, scale, plan)
        if step == 0:
            out, lse = block_out.to(acc), block_lse.to(acc)
        else:
            _merge(out[:, :, rows], lse[:, :, rows], block_out, block_lse)
        del block_out, block_lse  # free before the next step allocates its own
        if transfer is not None:
            kv = transfer.wait()
    return out.to(q.dtype), lse


def ring_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    scale: float,
    group: Optional[dist.ProcessGroup],
    doc_ids: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of ``ring_forward`` for this rank's shard, from its global out/lse.

    k, v must be this rank's own (un-rotated) K/V: the ring replays from them.
    """
    return ring_backward_planned(dout, q, k, v, out, lse, scale, group, _layout(doc_ids, group))


def ring_backward_planned(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
    group: Optional[dist.ProcessGroup], layout: Optional[DocumentLayout],
) -> tuple[Tensor, Tensor, Tensor]:
    """``ring_backward`` with the document plan already found (None: no masking)."""
    if group is None or dist.get_world_size(group) == 1:
        if layout is not None:
            return document_backward(dout, q, k, v, out, lse, layout.steps[0].plan, scale)
        return kernel_backward(dout, q, k, v, out, lse, True, scale)
    _check(q=q, k=k, v=v, dout=dout, out=out)
    ring = _Ring(group)
    c, acc = q.shape[2] // 2, accum_dtype(q.dtype)
    dq = torch.zeros_like(q, dtype=acc)  # laid out like q: the op returns it without a copy
    kv = torch.stack((k, v))
    dkv_transfer: _Transfer | None = None
    for step, (rows, keys, causal, plan) in enumerate(_steps(layout, ring, c)):
        kv_transfer = ring.exchange(kv, _KV_TAG) if step + 1 < ring.size else None
        block = kv[:, :, :, keys]
        # dQ sums in place; this block's dK/dV go to a buffer of their own while the
        # accumulator that travels with the block is still arriving from r−1.
        dkv_block = torch.zeros(block.shape, dtype=acc, device=block.device)
        _block_backward(
            dout[:, :, rows], q[:, :, rows], block[0], block[1], out[:, :, rows], lse[:, :, rows],
            causal, scale, (dq[:, :, rows], dkv_block[0], dkv_block[1]), plan,
        )
        if dkv_transfer is None:  # step 0 covers our whole block: the accumulator starts here
            dkv = dkv_block
        else:
            dkv = dkv_transfer.wait()
            dkv[:, :, :, keys] += dkv_block
        del dkv_block  # free before the next step allocates its own
        # Sent in fp32 on every step, the last hop included: after cp hops it is back with
        # its owner.
        dkv_transfer = ring.exchange(dkv, _DKV_TAG)
        if kv_transfer is not None:
            kv = kv_transfer.wait()
    dkv = dkv_transfer.wait()
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


# A custom op rather than an autograd.Function so that activation checkpointing's op-level
# policy (``parallel/activation_checkpointing.py``) sees the whole ring as one op and saves its outputs:
# recomputing a checkpointed block then reuses out/lse instead of running the ring (and its
# P2P exchanges) again. A process group is not an op argument type; its name is.
@torch.library.custom_op("longtrain::ring_attention", mutates_args=())
def _ring_attention_op(
    q: Tensor, k: Tensor, v: Tensor, scale: float, group_name: Optional[str], doc_ids: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    out, lse = ring_forward(q, k, v, scale, resolve_group(group_name), doc_ids)
    # out [B, H, T, D] laid out as [B, T, H, D] (flash kernels write it so; a merged ring
    # output is copied once), so the model's [B, T, H·D] view for wo is not another copy:
    # the one tensor is saved by this op and by wo. It is a fresh tensor, as op outputs must be.
    # lse contiguous: kernels lay it out differently ([B, T, H] on the CPU), and the fake
    # below must state one layout. It is T·H floats.
    return out.transpose(1, 2).contiguous().transpose(1, 2), lse.contiguous()


@_ring_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, scale: float, group_name: Optional[str], doc_ids: Optional[Tensor]):
    """Shapes, dtypes and strides of the op's outputs, so ``torch.compile`` traces through it."""
    B, H, T, _ = q.shape
    return empty_seq_major(q, (B, H, T, v.shape[-1])), q.new_empty((B, H, T), dtype=accum_dtype(q.dtype))


def empty_seq_major(like: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
    """An empty [B, H, T, D] tensor laid out as [B, T, H, D], the layout of the model's
    q/k/v (views of a linear's output) and of the [B, T, H·D] input of wo."""
    B, H, T, D = shape
    return like.new_empty((B, T, H, D)).transpose(1, 2)


def group_arg(group: Optional[dist.ProcessGroup]) -> Optional[str]:
    """A process group as a custom op takes it (a group is not an op argument type)."""
    return None if group is None else group.group_name


def resolve_group(name: Optional[str]) -> Optional[dist.ProcessGroup]:
    return None if name is None else _resolve_process_group(name)


def _setup_context(ctx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    q, k, v, scale, group_name, doc_ids = inputs
    # The original local k, v: replaying the ring from the last rotated block instead
    # gives wrong gradients under a correct forward.
    ctx.save_for_backward(q, k, v, *output)
    ctx.scale, ctx.group_name, ctx.doc_ids = scale, group_name, doc_ids
    ctx.mark_non_differentiable(output[1])


# The backward is an op too: torch.compile traces an op's autograd formula into its
# backward graph, and the ring's P2P exchanges and per-document rectangles (sizes read
# from doc_ids) cannot be traced; as an op the backward graph calls them as they are.
@torch.library.custom_op("longtrain::ring_attention_backward", mutates_args=())
def _ring_attention_backward_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
    group_name: Optional[str], doc_ids: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    grads = ring_backward(dense_last_dim(dout), q, k, v, out, lse, scale, resolve_group(group_name), doc_ids)
    # Fresh tensors laid out like the inputs, as the fake below states. The backward paths
    # allocate their gradients like their inputs; only the ring's dK and dV, views of the
    # one buffer it passes around (op outputs may not alias), are copied out.
    return tuple(
        g if g._base is None and g.stride() == x.stride() else torch.empty_like(x).copy_(g)
        for g, x in zip(grads, (q, k, v))
    )


@_ring_attention_backward_op.register_fake
def _(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
      group_name: Optional[str], doc_ids: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _backward(ctx, dout: Tensor, _dlse: Optional[Tensor]) -> tuple[Tensor | None, ...]:
    q, k, v, out, lse = ctx.saved_tensors
    grads = _ring_attention_backward_op(dout, q, k, v, out, lse, ctx.scale, ctx.group_name, ctx.doc_ids)
    return *grads, None, None, None


_ring_attention_op.register_autograd(_backward, setup_context=_setup_context)
RING_ATTENTION_OP = torch.ops.longtrain.ring_attention.default


def ring_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, group: Optional[dist.ProcessGroup], doc_ids: Optional[Tensor] = None
) -> Tensor:
    """Differentiable causal attention over a zigzag-sharded sequence (see module doc).

    q [B, Hq, 2c, D] and k/v [B, Hkv, 2c, D] are this rank's shard (``zigzag_shard``);
    returns this rank's rows of the output, [B, Hq, 2c, D]. ``doc_ids`` [B, 2c] (the
    shard's, zigzag-sharded like the tokens) keeps attention within documents. ``group``
    None: the whole sequence is local (the model's attention at cp = 1).
    """
    if doc_ids is not None:
        check_doc_ids(q, doc_ids)
    return _ring_attention_op(q, k, v, scale, group_arg(group), doc_ids)[0]
