"""Make a plain Transformer a parallel one, in torchtitan's order (``models/llama3/infra/
parallelize.py``): attention method → activation checkpointing → compile → FSDP2.

The model knows nothing of any of it: each step here replaces a block's attention or
forward in place, or wraps modules in FSDP2 units, and none changes a parameter's name,
so checkpoints and exports see the plain model.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from longtrain.attention.ring import ring_attention
from longtrain.attention.ulysses import ulysses_attention
from longtrain.config import Config
from longtrain.hardware import autocast_dtype
from longtrain.model.transformer import AttentionFn, Transformer
from longtrain.parallel.activation_checkpointing import apply_activation_checkpointing
from longtrain.parallel.mesh import ParallelDims


def parallelize(model: Transformer, cfg: Config, dims: ParallelDims) -> Transformer:
    """Context-parallel attention (cp > 1), checkpointing, compile, FSDP2 (world > 1)."""
    if dims.cp > 1:
        model.attention_fn = context_parallel_attention(dims)
    apply_activation_checkpointing(model.layers, cfg.model.activation_checkpointing)
    if cfg.model.compile:  # after the attention is chosen and the blocks checkpointed, before FSDP2 wraps them
        apply_compile(model)
    if dims.world_size > 1:
        apply_fsdp(model, dims, mixed_precision_policy(cfg.run.dtype, dims.device.type))
    return model


def context_parallel_attention(dims: ParallelDims) -> AttentionFn:
    """``parallel.cp_method``'s attention over the cp group: the zigzag ring, or Ulysses
    (its ring group None) and the hybrid, Ulysses under the ring."""
    if dims.cp_method == "ring":
        return functools.partial(ring_attention, group=dims.cp_group)
    return functools.partial(ulysses_attention, ulysses_group=dims.ulysses_group, ring_group=dims.ring_group)


def mixed_precision_policy(run_dtype: str, device_type: str) -> Optional[MixedPrecisionPolicy]:
    """FSDP2's bf16 parameters with fp32 gradient reduction for a bf16 run on CUDA, as
    torchtitan runs: all-gathers carry half the bytes while gradients are summed in fp32,
    and the bf16 weights a block computes with are FSDP2's own unsharded parameters, freed
    when the block reshards after its forward (autocast would otherwise cast the fp32
    weights and keep each bf16 copy until the backward). None on the CPU and for fp32:
    those runs are unchanged (the CPU demo's numbers are fixed)."""
    if device_type != "cuda" or autocast_dtype(run_dtype, device_type) != torch.bfloat16:
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def apply_compile(model: Transformer) -> None:
    """``torch.compile`` every block's forward in place (``model.compile``).

    The forward, not the module: hooks (FSDP2's all-gathers) stay in eager around it,
    the compiled graph holds the block's activation checkpointing (whose op-level
    policy inductor's partitioner honours), and parameter names are unchanged, so
    checkpoints and exports do not see a compiled model.
    """
    for block in model.layers:
        block.forward = torch.compile(block.forward, fullgraph=True)


def apply_fsdp(model: Transformer, dims: ParallelDims, mp_policy: Optional[MixedPrecisionPolicy] = None) -> Transformer:
    """FSDP2 per transformer block, then the root (embeddings, final norm, head), with
    ``mp_policy`` when given (``mixed_precision_policy``; FSDP2's default, none, otherwise).

    The loss on each rank is its token sum divided by the *global* token count, so the
    gradient we want is the sum over ranks, not FSDP's default mean: divide factor 1, with
    plain SUM collectives (gloo has no PREMUL_SUM, which FSDP would otherwise pick).
    """
    mesh = dims.dp_cp_mesh
    policy = {} if mp_policy is None else {"mp_policy": mp_policy}
    for block in model.layers:
        fully_shard(block, mesh=mesh, **policy)
    fully_shard(model, mesh=mesh, **policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model
