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

import torch
import torch.distributed as dist
from torch import Tensor

from longtrain.attention.documents import BlockPlan, block_plan
from longtrain.parallel.sharding import zigzag_shard

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
class DocumentLayout:
    """One rank's document-masking plan for one micro-batch: the block plan of every ring
    step (one step at cp = 1)."""

    blocks: list[BlockPlan]

    @classmethod
    def from_shards(cls, shards: Sequence[Tensor], rank: int) -> DocumentLayout:
        """The plan of ``rank`` from every cp rank's local doc ids ``shards`` [B, 2c]."""
        size, c = len(shards), shards[rank].shape[1] // 2
        blocks = []
        for step in range(size):
            rows, keys, _ = ring_block(step, rank, size, c)
            blocks.append(block_plan(shards[rank][:, rows], shards[(rank - step) % size][:, keys]))
        return cls(blocks)

    @classmethod
    def zigzag(cls, doc_ids: Tensor, rank: int, cp: int) -> DocumentLayout:
        """The plan of ``rank`` for whole-sequence doc ids [B, T] (host) sharded zigzag over cp."""
        return cls.from_shards([zigzag_shard(doc_ids, r, cp, dim=1) for r in range(cp)], rank)

    def prepare(self, device: torch.device, varlen: bool) -> None:
        """Build the varlen indices on ``device`` now, before the forward, if ``varlen``."""
        if varlen:
            for block in self.blocks:
                block.packed(device)


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
    shards = [torch.empty_like(doc_ids) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, doc_ids.contiguous(), group=group)
    return DocumentLayout.from_shards(shards, dist.get_rank(group))
