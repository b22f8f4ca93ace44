"""Local attention kernels that return (out, lse), and their backward.

Ring attention needs two things a plain SDPA call hides: the per-row logsumexp (to
merge partial results from different K/V blocks) and a backward that takes the
*global* out/lse of the merged result instead of recomputing its own. Flash-style
backward kernels are exactly that (P = exp(scale·QKᵀ − lse), D = rowsum(dO∘O)), so we
call them directly:

- CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ ``_backward``). Tiled;
  never materialises the T×S score matrix. Handles fp64 too (lse stays fp64). GQA
  natively from torch 2.9.
- CUDA, fp16/bf16: flash-attn 2.7+ when importable, else PyTorch's bundled flash
  kernel. Both do GQA natively.
- CUDA, fp32: PyTorch's memory-efficient kernel.

Layout everywhere is q [B, Hq, T, D], k/v [B, Hkv, S, D], lse [B, Hq, T]. GQA: q head h
uses kv head h // (Hq // Hkv) (HF ``repeat_kv`` order). Kernels without native GQA
(efficient, CPU before torch 2.9) run once per group member against the *un-repeated* K/V, so K/V are
never copied Hq/Hkv times; dK/dV are summed over the group.

The dtype contract: q, k, v (and in the backward dout and out) reach a kernel in one
dtype, the run's compute dtype (``compute_dtype``: the autocast dtype under autocast),
on one device, each with a contiguous last dimension; lse is fp32 (fp64 for fp64). The
entry points check this and raise instead of calling a kernel with mixed inputs: the
CUDA kernels take their element type from q alone, and the kernel is picked by q's dtype.
The model casts q, k, v to that dtype after QK-norm and RoPE, which CUDA autocast runs in
fp32 (``aten::rms_norm`` is on its fp32 list) while v comes out of a linear layer in bf16.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.torch_version import TorchVersion

try:  # optional CUDA dependency; absent on CPU installs
    import flash_attn
    from flash_attn.flash_attn_interface import _flash_attn_backward, _flash_attn_forward

    # These private entry points change signature between releases: 2.7 is the first with
    # the one called below (start-up checks the version: longtrain/hardware.py).
    FLASH_ATTN_VERSION: str | None = str(getattr(flash_attn, "__version__", "0"))
except ImportError:
    FLASH_ATTN_VERSION = None

aten = torch.ops.aten
# The CPU flash kernel takes fewer K/V heads than q heads from torch 2.9 (pytorch#157893);
# one call over all heads is faster than a call per group member, which sums dK/dV.
CPU_NATIVE_GQA = TorchVersion(torch.__version__) >= (2, 9)

ForwardFn = Callable[[Tensor, Tensor, Tensor, bool, float], tuple[Tensor, Tensor]]
BackwardFn = Callable[
    [Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, bool, float], tuple[Tensor, Tensor, Tensor]
]


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for lse, merges and gradient sums: fp32, or fp64 when the inputs are fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype attention runs in for activations like ``x``: the autocast dtype when
    autocast is on for x's device, else x's own dtype (the parameters' dtype)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


_HALF = (torch.float16, torch.bfloat16)
# What each device's kernels take: the CUDA ones have no fp64 (the efficient kernel is fp32/16).
_DEVICE_DTYPES = {
    "cpu": (torch.float64, torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
}


def kernel_backend(device_type: str, dtype: torch.dtype, has_flash_attn: bool | None = None) -> str:
    """The kernel ``kernel_forward``/``kernel_backward`` use for inputs of ``dtype`` on
    ``device_type``: "cpu", "flash_attn" (flash-attn importable: ``has_flash_attn``,
    default this process's), "sdpa_flash" (torch's bundled flash kernel) or "efficient"
    (torch's memory-efficient kernel, fp32)."""
    if device_type != "cuda":
        return "cpu"
    if dtype in _HALF:
        if has_flash_attn is None:
            has_flash_attn = FLASH_ATTN_VERSION is not None
        return "flash_attn" if has_flash_attn else "sdpa_flash"
    return "efficient"


# ------------------------------------------------ CPU
def _cpu_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def _cpu_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, scale=scale
    )


# ------------------------------------------------ CUDA: PyTorch's flash (fp16/bf16, native GQA)
def _sdpa_flash_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    out, lse, *_ = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, scale=scale)
    return out, lse


def _sdpa_flash_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    # cum_seq_q/k=None selects the dense (non-varlen) kernel; the philox tensors mirror
    # what the forward returns (rng_state [2], unused []) and are only read under dropout.
    seed = torch.zeros(2, dtype=torch.int64, device=q.device)
    offset = torch.empty(0, dtype=torch.int64, device=q.device)
    return aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse.contiguous(), None, None, q.shape[2], k.shape[2],
        0.0, causal, seed, offset, scale=scale,
    )


# ------------------------------------------------ CUDA: memory-efficient (fp32, no GQA)
_EFFICIENT_LSE_ALIGN = 32  # the kernel pads lse along T to this and its backward reads it padded


def _efficient_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    out, lse, _, _ = aten._scaled_dot_product_efficient_attention(
        q, k, v, None, True, 0.0, causal, scale=scale
    )
    return out, lse[..., : q.shape[2]]


def _efficient_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    lse = F.pad(lse, (0, -lse.shape[-1] % _EFFICIENT_LSE_ALIGN))  # pad rows are never used
    # The kernel takes out's row stride to be Hq·D (the [B, T, H, D] layout its forward
    # writes); a merged or sliced out is laid out otherwise.
    out = out.transpose(1, 2).contiguous().transpose(1, 2)
    unused = torch.empty((), dtype=torch.int64, device=q.device)  # philox seed/offset, dropout only
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, None, out, lse, unused, unused, 0.0, [True, True, True, False], causal, scale=scale
    )
    return dq, dk, dv


# ------------------------------------------------ CUDA: flash-attn ([B, T, H, D] layout, native GQA)
def _flash_attn_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    out, lse, _, _ = _flash_attn_forward(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        dropout_p=0.0, softmax_scale=scale, causal=causal, window_size_left=-1,
        window_size_right=-1, softcap=0.0, alibi_slopes=None, return_softmax=False,
    )
    return out.transpose(1, 2), lse


def _flash_attn_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v, out, dout = (x.transpose(1, 2) for x in (q, k, v, out, dout))
    # flash-attn writes into caller-allocated gradients (contiguous [B, T, H, D]).
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    _flash_attn_backward(
        dout, q, k, v, out, lse.contiguous(), dq, dk, dv,
        dropout_p=0.0, softmax_scale=scale, causal=causal, window_size_left=-1,
        window_size_right=-1, softcap=0.0, alibi_slopes=None, deterministic=False, rng_state=None,
    )
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


# ------------------------------------------------ GQA for kernels without it
def _grouped_forward(
    fwd: ForwardFn, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor]:
    hkv = k.shape[1]
    if q.shape[1] == hkv:
        return fwd(q, k, v, causal, scale)
    # [B, Hq, T, D] -> [B, Hkv, G, T, D]: slice g holds q heads {j·G + g}, which all map
    # to kv head j, so each call pairs Hkv query heads with the Hkv un-repeated K/V heads.
    qg = q.unflatten(1, (hkv, -1))
    out = q.new_empty(qg.shape)  # filled slice by slice: one output's worth of memory, not two
    lse = torch.empty(qg.shape[:-1], dtype=accum_dtype(q.dtype), device=q.device)
    for g in range(qg.shape[2]):
        out[:, :, g], lse[:, :, g] = fwd(qg[:, :, g], k, v, causal, scale)
    return out.flatten(1, 2), lse.flatten(1, 2)


def _grouped_backward_into(
    bwd: BackwardFn,
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    scale: float,
    grads: tuple[Tensor, Tensor, Tensor],
) -> None:
    """Add the gradients into ``grads`` = (dq, dk, dv), one q-head group per call (as in
    ``_grouped_forward``); dK/dV sum over the group."""
    dq, dk, dv = grads
    dout, q, out, lse, dq = (x.unflatten(1, (k.shape[1], -1)) for x in (dout, q, out, lse, dq))
    for g in range(q.shape[2]):
        dq_g, dk_g, dv_g = bwd(dout[:, :, g], q[:, :, g], k, v, out[:, :, g], lse[:, :, g], causal, scale)
        dq[:, :, g] += dq_g
        dk += dk_g
        dv += dv_g
        del dq_g, dk_g, dv_g  # free before the next call allocates its own


# ------------------------------------------------ dispatch
class AttentionInputError(ValueError):
    """Inputs a kernel must not be called with: mixed dtypes or devices, a bad layout or shape."""


def _listing(tensors: dict[str, Tensor], attr) -> str:
    return ", ".join(f"{name} {attr(t)}" for name, t in tensors.items())


def dense_last_dim(grad: Tensor) -> Tensor:
    """An output gradient as the kernels read it, rows of D contiguous elements: autograd
    hands an expanded (stride 0) one to a loss that sums the output. For the autograd
    backward entries, once per backward, not per kernel call."""
    return grad if grad.stride(-1) == 1 else grad.contiguous()


def check_inputs(**tensors: Tensor) -> None:
    """The dtype contract (module doc): one dtype and one device for all of ``tensors``
    (q, k, v; in the backward also dout, out), one the device's kernels take, and dense
    tensors with a contiguous last dimension (the flash kernels read rows of D elements)."""
    first = next(iter(tensors.values()))
    if any(t.dtype != first.dtype for t in tensors.values()):
        raise AttentionInputError(
            f"attention kernels take {', '.join(tensors)} in one dtype, the run's compute dtype "
            f"(under autocast the autocast dtype); got {_listing(tensors, lambda t: t.dtype)}: "
            "cast them before the kernel (the model does, after QK-norm and RoPE)"
        )
    if any(t.device != first.device for t in tensors.values()):
        raise AttentionInputError(
            f"attention kernels take {', '.join(tensors)} on one device; got {_listing(tensors, lambda t: t.device)}"
        )
    supported = _DEVICE_DTYPES.get(first.device.type)
    if supported is None or first.dtype not in supported:
        raise AttentionInputError(
            f"no attention kernel for {first.dtype} on {first.device.type}; "
            f"valid: cpu ({', '.join(map(str, _DEVICE_DTYPES['cpu']))}), "
            f"cuda ({', '.join(map(str, _DEVICE_DTYPES['cuda']))})"
        )
    for name, t in tensors.items():
        if t.layout != torch.strided or t.dim() == 0 or t.stride(-1) != 1:
            raise AttentionInputError(
                f"attention kernels take dense tensors with a contiguous last dimension; "
                f"{name} has layout {t.layout}, strides {t.stride() if t.layout == torch.strided else '-'}"
            )


def _check(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise AttentionInputError(
            "expected q [B, Hq, T, D] and k, v [B, Hkv, S, D]; "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[1] % k.shape[1] != 0 or q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0]:
        raise AttentionInputError(
            f"q {tuple(q.shape)} and k/v {tuple(k.shape)}: batch and head_dim must match "
            "and Hq must be a multiple of Hkv"
        )
    # Kernels disagree on where the diagonal sits when T != S (top-left vs bottom-right);
    # we only ever need the square case.
    if causal and q.shape[2] != k.shape[2]:
        raise AttentionInputError(f"causal attention needs T == S, got T={q.shape[2]}, S={k.shape[2]}")


def _check_lse(lse: Tensor, q: Tensor) -> None:
    if lse.dtype != accum_dtype(q.dtype) or lse.device != q.device or lse.shape != q.shape[:-1]:
        raise AttentionInputError(
            f"lse must be {accum_dtype(q.dtype)} {tuple(q.shape[:-1])} on {q.device} for q {q.dtype}; "
            f"got {lse.dtype} {tuple(lse.shape)} on {lse.device}"
        )


def kernel_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Attention of q [B, Hq, T, D] over k/v [B, Hkv, S, D].

    Returns out [B, Hq, T, D] (q's dtype) and lse [B, Hq, T], the natural-log logsumexp
    of scale·qkᵀ per query row (fp32; fp64 for fp64 inputs). Causal is top-left aligned:
    query i sees keys j <= i. No autograd; see ``attention``.
    """
    check_inputs(q=q, k=k, v=v)
    _check(q, k, v, causal)
    backend = kernel_backend(q.device.type, q.dtype)
    if backend == "cpu":
        return (_cpu_forward if CPU_NATIVE_GQA else partial(_grouped_forward, _cpu_forward))(q, k, v, causal, scale)
    if backend == "flash_attn":
        return _flash_attn_fwd(q, k, v, causal, scale)
    if backend == "sdpa_flash":
        return _sdpa_flash_forward(q, k, v, causal, scale)
    return _grouped_forward(_efficient_forward, q, k, v, causal, scale)


def kernel_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    scale: float,
    grads: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of one attention block, recomputed flash-style from out/lse.

    ``out``/``lse`` need not come from this block: ring attention passes the globally
    merged ones, so P = exp(scale·qkᵀ − lse) is this block's share of the global softmax
    and D = rowsum(dout∘out) is the global correction term.

    With ``grads`` = (dq, dk, dv) buffers (e.g. fp32 accumulators, or views into them)
    the gradients are added into those and they are returned: ring attention sums one
    block per step and this spares it a block-sized gradient per step.
    """
    check_inputs(q=q, k=k, v=v, dout=dout, out=out)
    _check(q, k, v, causal)
    if dout.shape != q.shape or out.shape != q.shape:
        raise AttentionInputError(
            f"dout {tuple(dout.shape)} and out {tuple(out.shape)} must have q's shape {tuple(q.shape)}"
        )
    _check_lse(lse, q)
    backend = kernel_backend(q.device.type, q.dtype)
    native_gqa = {"flash_attn": _flash_attn_bwd, "sdpa_flash": _sdpa_flash_backward, "cpu": _cpu_backward}
    if backend in native_gqa and (backend != "cpu" or CPU_NATIVE_GQA):
        bwd = native_gqa[backend]
        block = bwd(dout, q, k, v, out, lse, causal, scale)
        if grads is None:
            return block
        for acc, g in zip(grads, block):
            acc += g
        return grads
    bwd = _efficient_backward if backend == "efficient" else _cpu_backward
    if grads is not None:
        _grouped_backward_into(bwd, dout, q, k, v, out, lse, causal, scale, grads)
        return grads
    if q.shape[1] == k.shape[1]:
        return bwd(dout, q, k, v, out, lse, causal, scale)
    dq = torch.zeros_like(q)
    dk, dv = (torch.zeros(x.shape, dtype=accum_dtype(x.dtype), device=x.device) for x in (k, v))
    _grouped_backward_into(bwd, dout, q, k, v, out, lse, causal, scale, (dq, dk, dv))
    return dq, dk.to(k.dtype), dv.to(v.dtype)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
        out, lse = kernel_forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor, _dlse: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = kernel_backward(dense_last_dim(dout), q, k, v, out, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def attention(
    q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Differentiable attention returning (out, lse); scale defaults to head_dim**-0.5.

    Gradients flow to q, k, v through ``out`` only: ``lse`` is returned for inspection
    and merging and is marked non-differentiable, so a loss built on it gets no gradient
    from it.
    """
    return _Attention.apply(q, k, v, causal, q.shape[-1] ** -0.5 if scale is None else scale)
