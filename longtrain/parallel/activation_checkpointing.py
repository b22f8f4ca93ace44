"""Activation checkpointing of transformer blocks (``model.activation_checkpointing``).

A checkpointed block keeps only its input (and what its policy saves) through the forward
and recomputes the rest in the backward, through torch's own machinery: non-reentrant
``torch.utils.checkpoint`` with an op-level policy (``create_selective_checkpoint_contexts``,
as torchtitan's ``apply_ac``). Modes:

- ``none``: every activation is kept.
- ``full``: everything is recomputed except the attention op's outputs (out, lse). The
  attention kernel is the one op whose recomputation costs O(T²), and under context
  parallelism it is the ring or Ulysses, whose recomputation would run every P2P exchange
  or all-to-all again (Ulysses' outputs include its head-side tensors, which its backward uses).
- ``selective``: also keeps every matmul's output and recomputes only the cheap ops in
  between (norms, RoPE, SiLU, products, casts): less memory saved, little compute added.

The checkpoint wraps each block's forward in place (``parallelize`` applies it before
compile and FSDP2), so under FSDP2 it sits inside the block's ``fully_shard`` unit (as
torchtitan's wrapper does): the recomputation sees the block's parameters unsharded by
FSDP's pre-backward all-gather. Wrapping the forward rather than the module keeps the
parameter names, so checkpoints and exports do not see it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from longtrain.attention.ring import RING_ATTENTION_OP
from longtrain.attention.ulysses import ULYSSES_ATTENTION_OP

_ATTENTION_OPS = frozenset({RING_ATTENTION_OP, ULYSSES_ATTENTION_OP})  # every cp_method's
_SAVED_OPS = {
    "full": _ATTENTION_OPS,
    "selective": _ATTENTION_OPS | {torch.ops.aten.mm.default},
}


def _policy(saved: frozenset, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE


def _context_fn(mode: str) -> Callable:
    return functools.partial(create_selective_checkpoint_contexts, functools.partial(_policy, _SAVED_OPS[mode]))


def run_checkpointed(mode: str, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """``fn(*args)``, its activations kept as ``mode`` (full or selective) says (see the module doc)."""
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_context_fn(mode))


def apply_activation_checkpointing(blocks: nn.ModuleList, mode: str) -> None:
    """Checkpoint every block's forward as ``mode`` says (``none``: leave it as it is)."""
    if mode == "none":
        return
    for block in blocks:
        block.forward = functools.partial(run_checkpointed, mode, block.forward)
