"""Document masking: a token attends only to earlier tokens of its own document.

Packed samples hold several documents; ``doc_ids`` [B, T] numbers them per token and
never decreases along the sequence. Any set of tokens kept in sequence order (a whole
sample, or a zigzag shard: chunk r then chunk 2·cp−1−r) therefore has sorted doc ids,
so the live (query, key) pairs of a block are a union of rectangles, one per document
present on both sides. We call the local kernel once per rectangle rather than
materialising a T×S mask:

- work is saved: a block of 8K with 1K documents costs eight 1K² triangles, not one 8K²
  triangle, and a ring block that shares no document with the queries costs nothing;
- no padding and no divisibility rule on documents: a rectangle is any size, one token
  included;
- the causal (diagonal) block cuts into square per-document triangles, where the
  kernel's top-left causal alignment is the right one.

The kernel's (out, lse) per rectangle is the block result for those rows, since each
query row belongs to one document. Rows with no live key in a block keep out = 0,
lse = −inf, which ``ring._merge`` folds in as a no-op; on its diagonal block every
row sees at least itself, so a merged lse is always finite. The backward replays the
same rectangles with the global out/lse (``kernel_backward``).

CUDA with flash-attn (fp16/bf16): a block's rectangles over the whole batch become one
varlen call instead of one launch each. The rows and keys of each rectangle are gathered
into packed [total, H, D] tensors with cu_seqlens at the rectangle edges (a rectangle is
a "sequence": its own rows against its own keys; square and bottom-right-causal on the
diagonal block, which is top-left there), and out/lse are scattered back. The gather and
scatter are tested on the CPU with the kernel swapped for per-rectangle CPU calls; the
flash-attn call itself has not run here (no GPU).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dataclasses import dataclass, field
from typing import Optional

from longtrain.attention.kernels import accum_dtype, dense_last_dim, kernel_backward, kernel_forward

try:  # optional CUDA dependency; absent on CPU installs
    from flash_attn.flash_attn_interface import _flash_attn_varlen_backward, _flash_attn_varlen_forward
except ImportError:
    _flash_attn_varlen_forward = _flash_attn_varlen_backward = None

Rectangle = tuple[int, int, int, int]  # query rows [q0, q1) × keys [k0, k1)


def _runs(doc_ids: Tensor) -> dict[int, tuple[int, int]]:
    """{doc: (start, end)} of a 1-D nondecreasing doc-id sequence."""
    docs, counts = torch.unique_consecutive(doc_ids, return_counts=True)
    ends = counts.cumsum(0).tolist()
    return {d: (e - n, e) for d, n, e in zip(docs.tolist(), counts.tolist(), ends)}


def document_rectangles(q_docs: Tensor, k_docs: Tensor) -> list[Rectangle]:
    """The live rectangles of one block: one per document present among both the queries
    (``q_docs``, 1-D) and the keys (``k_docs``, 1-D), both nondecreasing."""
    if q_docs.numel() and (q_docs.diff() < 0).any() or k_docs.numel() and (k_docs.diff() < 0).any():
        raise ValueError("doc_ids must be nondecreasing along the sequence (documents are packed in order)")
    keys = _runs(k_docs)
    return [(q0, q1, *keys[d]) for d, (q0, q1) in _runs(q_docs).items() if d in keys]


def _batch_rectangles(q_docs: Tensor, k_docs: Tensor) -> list[tuple[slice, list[Rectangle]]]:
    """(batch rows, their rectangles): one batched group when every row has the same
    rectangles (a batch of single documents, e.g. retrieval samples), else row by row."""
    return _grouped([document_rectangles(q_docs[b], k_docs[b]) for b in range(q_docs.shape[0])])


def _grouped(per_row: list[list[Rectangle]]) -> list[tuple[slice, list[Rectangle]]]:
    if all(r == per_row[0] for r in per_row):
        return [(slice(None), per_row[0])]
    return [(slice(b, b + 1), r) for b, r in enumerate(per_row)]


@dataclass
class _Packed:
    """Where a block's rectangles sit in flat [B·len] token order, for one varlen call."""

    q_index: Tensor  # rows, rectangle after rectangle
    k_index: Tensor
    cu_q: Tensor  # int32 rectangle edges in the packed rows / keys
    cu_k: Tensor
    max_q: int
    max_k: int


@dataclass
class BlockPlan:
    """The live rectangles of one block (rows × keys), found from the doc ids on the host
    once and then used by every layer, forward and backward: no kernel call here reads a
    document boundary from a device tensor."""

    groups: list[tuple[slice, list[Rectangle]]]  # (batch rows, their rectangles)
    batch: int
    rows: int
    keys: int
    _packed: dict[torch.device, Optional[_Packed]] = field(default_factory=dict, repr=False)

    @classmethod
    def of_rows(cls, per_row: list[list[Rectangle]], rows: int, keys: int) -> BlockPlan:
        """The plan of a block whose batch row b has rectangles ``per_row[b]``."""
        return cls(_grouped(per_row), len(per_row), rows, keys)

    def work(self, causal: bool) -> int:
        """(query, key) pairs the block computes: its rectangles' areas, triangles when causal."""
        per_row = {b: rects for rows, rects in self.groups for b in range(self.batch)[rows]}
        return sum(
            (q1 - q0) * (q1 - q0 + 1) // 2 if causal else (q1 - q0) * (k1 - k0)
            for rects in per_row.values() for q0, q1, k0, k1 in rects
        )

    def rectangles(self) -> list[tuple[int, Rectangle]]:
        """(batch row, rectangle) of every rectangle, batch row by batch row."""
        per_row = {b: rects for rows, rects in self.groups for b in range(self.batch)[rows]}
        return [(b, r) for b in range(self.batch) for r in per_row[b]]

    def packed(self, device: torch.device) -> Optional[_Packed]:
        """The varlen call's indices on ``device``, built on the first call (None: no rectangle)."""
        if device not in self._packed:
            self._packed[device] = _pack(self.rectangles(), self.rows, self.keys, device)
        return self._packed[device]


def block_plan(q_docs: Tensor, k_docs: Tensor) -> BlockPlan:
    """The plan of the block whose rows have doc ids ``q_docs`` [B, T] and keys ``k_docs``
    [B, S] (host tensors, each row nondecreasing)."""
    return BlockPlan(_batch_rectangles(q_docs, k_docs), q_docs.shape[0], q_docs.shape[1], k_docs.shape[1])


def _pack(rects: list[tuple[int, Rectangle]], T: int, S: int, device: torch.device) -> Optional[_Packed]:
    if not rects:
        return None
    q_index = torch.cat([torch.arange(b * T + q0, b * T + q1) for b, (q0, q1, _, _) in rects])
    k_index = torch.cat([torch.arange(b * S + k0, b * S + k1) for b, (_, _, k0, k1) in rects])
    q_lens, k_lens = [q1 - q0 for _, (q0, q1, _, _) in rects], [k1 - k0 for _, (_, _, k0, k1) in rects]
    cu = lambda lens: torch.tensor([0, *lens]).cumsum(0).to(torch.int32).to(device)  # noqa: E731
    return _Packed(q_index.to(device), k_index.to(device), cu(q_lens), cu(k_lens), max(q_lens), max(k_lens))


def _flat(x: Tensor) -> Tensor:
    """[B, H, L, D] -> [B·L, H, D], flash-attn's packed layout."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])


def varlen_available(device: torch.device) -> bool:
    """Whether half-precision document masking on ``device`` runs as flash-attn varlen calls."""
    return device.type == "cuda" and _flash_attn_varlen_forward is not None


def _uses_varlen(q: Tensor) -> bool:
    return q.dtype in (torch.float16, torch.bfloat16) and varlen_available(q.device)


def _varlen_forward(q: Tensor, k: Tensor, v: Tensor, p: Optional[_Packed], causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    B, H, T, D = q.shape
    out = q.new_zeros(B * T, H, D)
    lse = torch.full((H, B * T), float("-inf"), dtype=accum_dtype(q.dtype), device=q.device)
    if p is not None:
        o, l, *_ = _flash_attn_varlen_forward(
            _flat(q)[p.q_index], _flat(k)[p.k_index], _flat(v)[p.k_index], p.cu_q, p.cu_k, p.max_q, p.max_k,
            0.0, scale, causal, -1, -1, 0.0, None, False,
        )
        out[p.q_index], lse[:, p.q_index] = o, l  # varlen lse is [H, total_q]
    return out.view(B, T, H, D).transpose(1, 2), lse.view(H, B, T).transpose(0, 1).contiguous()


def _varlen_backward_into(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, p: Optional[_Packed],
    causal: bool, scale: float, grads: tuple[Tensor, Tensor, Tensor],
) -> None:
    if p is None:
        return
    qs, ks, vs = _flat(q)[p.q_index], _flat(k)[p.k_index], _flat(v)[p.k_index]
    block = tuple(torch.empty_like(x) for x in (qs, ks, vs))  # flash-attn writes into these
    lse_rows = lse.transpose(0, 1).reshape(lse.shape[1], -1)[:, p.q_index].contiguous()
    _flash_attn_varlen_backward(
        _flat(dout)[p.q_index], qs, ks, vs, _flat(out)[p.q_index], lse_rows, *block,
        p.cu_q, p.cu_k, p.max_q, p.max_k, 0.0, scale, causal, -1, -1, 0.0, None, False, None,
    )
    for acc, g, index in zip(grads, block, (p.q_index, p.k_index, p.k_index)):
        B, H, L, D = acc.shape
        full = acc.new_zeros(B * L, H, D)
        full[index] = g.to(acc.dtype)  # a token is in at most one rectangle of a block
        acc += full.view(B, L, H, D).transpose(1, 2)


def document_forward(q: Tensor, k: Tensor, v: Tensor, plan: BlockPlan, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Same-document attention of q [B, Hq, T, D] over k/v [B, Hkv, S, D]: (out, lse).

    ``plan`` holds the block's rectangles (``block_plan`` of the rows' and keys' doc ids).
    With ``causal`` the block is a diagonal one (same tokens on both sides). Rows with no
    live key get out = 0 and lse = −inf.
    """
    if _uses_varlen(q):
        return _varlen_forward(q, k, v, plan.packed(q.device), causal, scale)
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=accum_dtype(q.dtype), device=q.device)
    for batch, rectangles in plan.groups:
        for q0, q1, k0, k1 in rectangles:
            rows, keys = (batch, slice(None), slice(q0, q1)), (batch, slice(None), slice(k0, k1))
            out[rows], lse[rows] = kernel_forward(q[rows], k[keys], v[keys], causal, scale)
    return out, lse


def document_backward_into(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    plan: BlockPlan, causal: bool, scale: float, grads: tuple[Tensor, Tensor, Tensor],
) -> None:
    """Add the gradients of ``document_forward`` into ``grads`` = (dq, dk, dv) buffers,
    recomputed per rectangle from the (global) out/lse, as ``kernel_backward`` does."""
    dq, dk, dv = grads
    if _uses_varlen(q):
        return _varlen_backward_into(dout, q, k, v, out, lse, plan.packed(q.device), causal, scale, grads)
    for batch, rectangles in plan.groups:
        for q0, q1, k0, k1 in rectangles:
            rows, keys = (batch, slice(None), slice(q0, q1)), (batch, slice(None), slice(k0, k1))
            kernel_backward(
                dout[rows], q[rows], k[keys], v[keys], out[rows], lse[rows], causal, scale,
                grads=(dq[rows], dk[keys], dv[keys]),
            )


def document_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, plan: BlockPlan, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of causal document-masked attention over one whole sequence."""
    acc = accum_dtype(q.dtype)
    grads = tuple(torch.zeros_like(x, dtype=acc) for x in (q, k, v))  # laid out like the inputs
    document_backward_into(dout, q, k, v, out, lse, plan, True, scale, grads)
    return tuple(g.to(x.dtype) for g, x in zip(grads, (q, k, v)))


class _DocumentAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, plan: BlockPlan, scale: float) -> tuple[Tensor, Tensor]:
        out, lse = document_forward(q, k, v, plan, True, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.plan = scale, plan
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor, _dlse: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        return *document_backward(dense_last_dim(dout), q, k, v, out, lse, ctx.plan, ctx.scale), None, None


def check_doc_ids(q: Tensor, doc_ids: Tensor) -> None:
    """``doc_ids`` must number q's [B, T] tokens."""
    if doc_ids.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"doc_ids must be [B, T] = {(q.shape[0], q.shape[2])}, got {tuple(doc_ids.shape)}")


def document_attention(q: Tensor, k: Tensor, v: Tensor, doc_ids: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Differentiable causal attention within documents: (out, lse) of q [B, Hq, T, D] over
    k/v [B, Hkv, T, D], ``doc_ids`` [B, T] nondecreasing per row."""
    check_doc_ids(q, doc_ids)
    return _DocumentAttention.apply(q, k, v, block_plan(doc_ids, doc_ids), scale)
