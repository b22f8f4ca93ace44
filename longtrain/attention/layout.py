"""Where each ring step's work is: the zigzag schedule, and under document masking the
live rectangles of every block, planned once per micro-batch on the host.

Document masking needs, for each ring step, the documents of the rows and of the K/V
block held at that step. Read from device tensors inside attention, that is a device→host
sync per layer and ring step (and again in the backward) plus a collective of every
rank's doc ids. The loader's batch is on the host and holds the whole sequence, so every
rank can plan every step's rectangles before the forward, without a collective:

    with use_layout(local_doc_ids, DocumentLayout.zigzag(full_doc_ids, rank, cp)):
        loss = model(..., doc_ids=local_doc_ids); loss.backward()

Attention finds the plan from the doc-id tensor it is handed (``layout_for``); a custom op
takes only tensors, so the plan is registered under that tensor's storage for the
duration of the block. Called without a registered plan (a direct call, a test),
attention plans the call itself from the device tensors, as it always could: correct,
with the syncs this module exists to avoid.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from longtrain.attention.documents import BlockPlan, Rectangle, block_plan
from longtrain.parallel.sharding import document_zigzag_index, zigzag_shard, zigzag_shard_batch

_ALL = slice(None)


def ring_block(step: int, rank: int, size: int, c: int) -> tuple[slice, slice, bool]:
    """(local q rows, held K/V keys, causal) that ``rank`` computes at ``step`` of the
    zigzag ring (see ``ring.py``); ``c`` is the chunk length, half the local length."""
    src = (rank - step) % size
    if step == 0:
        return _ALL, _ALL, True
    if src < rank:
        return _ALL, slice(0, c), False
    return slice(c, None), _ALL, False


@dataclass
class RingStep:
    """What a rank computes at one ring step: local rows × held keys (slices), whether the
    block is the diagonal one, and the block's document rectangles."""

    rows: slice
    keys: slice
    causal: bool
    plan: BlockPlan


@dataclass
class DocumentLayout:
    """One rank's document-masking plan for one micro-batch: every ring step's block (one
    step at cp = 1)."""

    steps: list[RingStep]

    @classmethod
    def from_shards(cls, shards: Sequence[Tensor], rank: int) -> DocumentLayout:
        """The plan of ``rank`` from every cp rank's zigzag-local doc ids ``shards`` [B, 2c]."""
        size, c = len(shards), shards[rank].shape[1] // 2
        steps = []
        for step in range(size):
            rows, keys, causal = ring_block(step, rank, size, c)
            steps.append(RingStep(rows, keys, causal, block_plan(shards[rank][:, rows], shards[(rank - step) % size][:, keys])))
        return cls(steps)

    @classmethod
    def zigzag(cls, doc_ids: Tensor, rank: int, cp: int) -> DocumentLayout:
        """The plan of ``rank`` for whole-sequence doc ids [B, T] (host) sharded zigzag over cp."""
        return cls.from_shards([zigzag_shard(doc_ids, r, cp, dim=1) for r in range(cp)], rank)

    @classmethod
    def by_documents(cls, doc_ids: Tensor, index: Tensor, rank: int) -> DocumentLayout:
        """The plan of ``rank`` for whole-sequence doc ids [B, T] (host) sharded by
        ``index`` [cp, B, T/cp] (``sharding.document_zigzag_index``).

        Every step is whole local rows × the whole held block: the rectangles say what is
        live. The diagonal block is each document's local run, causal (local order is
        sequence order); an off-diagonal block pairs each local piece of a document with
        the held pieces of it that come earlier in the sequence.
        """
        cp, B = index.shape[0], index.shape[1]
        local_docs = [doc_ids.gather(1, index[r]) for r in range(cp)]
        pieces = [[_pieces(index[r, b].numpy(), local_docs[r][b].numpy()) for b in range(B)] for r in range(cp)]
        steps = [RingStep(_ALL, _ALL, True, block_plan(local_docs[rank], local_docs[rank]))]
        for step in range(1, cp):
            src = (rank - step) % cp
            rects = [_earlier_rectangles(pieces[rank][b], pieces[src][b]) for b in range(B)]
            steps.append(RingStep(_ALL, _ALL, False, BlockPlan.of_rows(rects, index.shape[2], index.shape[2])))
        return cls(steps)

    def prepare(self, device: torch.device, varlen: bool) -> None:
        """Build the varlen indices on ``device`` now, before the forward, if ``varlen``."""
        if varlen:
            for step in self.steps:
                step.plan.packed(device)

    def work(self) -> int:
        """Causal attention work of this rank: (query, key) pairs computed over all steps."""
        return sum(step.plan.work(step.causal) for step in self.steps)


def shard_with_layout(batch: dict[str, Tensor], rank: int, cp: int, load_balancer: str) -> tuple[dict[str, Tensor], DocumentLayout]:
    """This rank's shard of every [B, T] tensor of a whole-sequence, document-masked batch
    (host tensors, ``doc_ids`` among them) and attention's plan for it: sharded per
    document (``load_balancer`` "documents", cp > 1) or zigzag by position."""
    if cp > 1 and load_balancer == "documents":
        index = document_zigzag_index(batch["doc_ids"], cp)
        local = {k: v.gather(1, index[rank]) for k, v in batch.items()}
        return local, DocumentLayout.by_documents(batch["doc_ids"], index, rank)
    return zigzag_shard_batch(batch, rank, cp), DocumentLayout.zigzag(batch["doc_ids"], rank, cp)


Piece = tuple[int, int, int, int, int]  # (doc, first position, end position, local start, local end)


def _pieces(positions: np.ndarray, docs: np.ndarray) -> list[Piece]:
    """Maximal runs of consecutive sequence positions within one document."""
    breaks = np.flatnonzero((np.diff(positions) != 1) | (np.diff(docs) != 0)) + 1
    starts, ends = np.concatenate([[0], breaks]), np.concatenate([breaks, [len(positions)]])
    return [(int(docs[a]), int(positions[a]), int(positions[e - 1]) + 1, int(a), int(e)) for a, e in zip(starts, ends)]


def _earlier_rectangles(rows: list[Piece], keys: list[Piece]) -> list[Rectangle]:
    """Rectangles of row pieces × key pieces of the same document that end before the row
    piece starts, merged where adjacent, so that a row or key is in at most one."""
    held: dict[int, list[Piece]] = {}
    for k in keys:  # by document: pairing every row piece with every key piece is quadratic in documents
        held.setdefault(k[0], []).append(k)
    rects = sorted((r[3], r[4], k[3], k[4]) for r in rows for k in held.get(r[0], ()) if k[2] <= r[1])
    by_keys: list[Rectangle] = []
    for q0, q1, k0, k1 in rects:  # a row piece's earlier keys: a run of local keys
        if by_keys and by_keys[-1][:2] == (q0, q1) and by_keys[-1][3] == k0:
            by_keys[-1] = (q0, q1, by_keys[-1][2], k1)
        else:
            by_keys.append((q0, q1, k0, k1))
    merged: list[Rectangle] = []
    for q0, q1, k0, k1 in sorted(by_keys, key=lambda r: (r[2], r[3], r[0])):  # pieces sharing those keys
        if merged and merged[-1][2:] == (k0, k1) and merged[-1][1] == q0:
            merged[-1] = (merged[-1][0], q1, k0, k1)
        else:
            merged.append((q0, q1, k0, k1))
    return sorted(merged)


_REGISTERED: dict[tuple, tuple[Tensor, DocumentLayout]] = {}


def _key(doc_ids: Tensor) -> tuple:
    # The storage, not the Python object: compiled code may hand the op another tensor
    # object over the same memory. The registered tensor is held, so the memory is not reused.
    return doc_ids.device, doc_ids.data_ptr(), tuple(doc_ids.shape), tuple(doc_ids.stride())


@contextlib.contextmanager
def use_layout(doc_ids: Tensor, layout: DocumentLayout) -> Iterator[None]:
    """Attention given ``doc_ids`` (the local doc ids the model is called with) uses
    ``layout`` inside the block: wrap a micro-batch's forward and backward in it."""
    key = _key(doc_ids)
    _REGISTERED[key] = (doc_ids, layout)
    try:
        yield
    finally:
        del _REGISTERED[key]


def registered_layout(doc_ids: Tensor) -> Optional[DocumentLayout]:
    """The plan registered for ``doc_ids`` by ``use_layout``, if any."""
    registered = _REGISTERED.get(_key(doc_ids))
    return None if registered is None else registered[1]


def layout_for(doc_ids: Tensor, group: Optional[dist.ProcessGroup]) -> DocumentLayout:
    """The registered plan for ``doc_ids`` (this rank's [B, 2c]), or one planned now from
    them and, at cp > 1, every cp rank's doc ids gathered."""
    registered = registered_layout(doc_ids)
    if registered is not None:
        return registered
    if group is None or dist.get_world_size(group) == 1:
        return DocumentLayout.from_shards([doc_ids], 0)
    return DocumentLayout.from_shards(gather_shards(doc_ids, group), dist.get_rank(group))


def gather_shards(x: Tensor, group: dist.ProcessGroup) -> list[Tensor]:
    """Every rank's ``x`` in ``group``, in the group's rank order."""
    shards = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, x.contiguous(), group=group)
    return shards
