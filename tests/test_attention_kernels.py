import pytest
import torch

from longtrain.attention.kernels import (
    AttentionInputError,
    attention,
    kernel_backend,
    kernel_backward,
    kernel_forward,
)
from longtrain.attention import kernels
from longtrain.attention.ring import ring_backward, ring_forward

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def reference(q, k, v, causal, scale):
    """Explicit-score attention in fp64 with repeated kv heads: (out, lse)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = scale * q.double() @ k.transpose(-1, -2)
    if causal:
        t = q.shape[2]
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.softmax(s, -1) @ v, lse


def reference_backward(dout, q, k, v, out, lse, causal, scale):
    """The flash backward formulas with a given (possibly global) out and lse, in fp64."""
    g = q.shape[1] // k.shape[1]
    q, dout, out, lse = q.double(), dout.double(), out.double(), lse.double()
    kr, vr = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    p = torch.exp(scale * q @ kr.transpose(-1, -2) - lse[..., None])
    if causal:
        p = p.tril()
    d = (dout * out).sum(-1, keepdim=True)
    ds = p * (dout @ vr.transpose(-1, -2) - d)
    dq = scale * ds @ kr
    dk = (scale * ds.transpose(-1, -2) @ q).unflatten(1, (k.shape[1], g)).sum(2)
    dv = (p.transpose(-1, -2) @ dout).unflatten(1, (k.shape[1], g)).sum(2)
    return dq, dk, dv


def make(b, hq, hkv, t, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(b, hq, t, d, generator=gen, dtype=dtype) for _ in range(2))
    k, v = (torch.randn(b, hkv, t, d, generator=gen, dtype=dtype) for _ in range(2))
    return q, k, v, dout


@pytest.mark.parametrize("native_gqa", [True, False], ids=["native-gqa", "per-group"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", [(1, 1), (4, 4), (8, 2), (8, 1), (4, 2)])
@pytest.mark.parametrize("t", [64, 100])
def test_attention_matches_reference(dtype, causal, hq, hkv, t, native_gqa, monkeypatch):
    """Both CPU GQA paths: one kernel call over all heads (torch >= 2.9) and a call per
    group member (older torch; the path CUDA's fp32 kernel takes)."""
    if native_gqa and not kernels.CPU_NATIVE_GQA:
        pytest.skip("this torch's CPU kernel has no native GQA")
    monkeypatch.setattr(kernels, "CPU_NATIVE_GQA", native_gqa)
    q, k, v, dout = make(2, hq, hkv, t, 16, dtype)
    scale = 0.3
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = attention(q, k, v, causal=causal, scale=scale)
    out.backward(dout)

    ref_q, ref_k, ref_v = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = reference(ref_q, ref_k, ref_v, causal, scale)
    ref_out.backward(dout.double())

    assert out.dtype == dtype and lse.dtype == dtype and lse.shape == (2, hq, t)
    for got, want in [(out, ref_out), (lse, ref_lse), (q.grad, ref_q.grad), (k.grad, ref_k.grad),
                      (v.grad, ref_v.grad)]:
        torch.testing.assert_close(got, want.to(dtype), **TOL[dtype])


def test_default_scale_and_lse_not_differentiable():
    q, k, v, _ = make(1, 4, 2, 32, 8, torch.float64)
    q.requires_grad_()
    out, lse = attention(q, k, v)
    torch.testing.assert_close(out, reference(q, k, v, True, 8**-0.5)[0], **TOL[torch.float64])
    assert out.requires_grad and not lse.requires_grad


def test_bf16_returns_fp32_lse():
    q, k, v, _ = make(1, 4, 2, 32, 8, torch.bfloat16)
    out, lse = kernel_forward(q, k, v, True, 0.5)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(lse, reference(q, k, v, True, 0.5)[1].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (4, 1)])
def test_backward_with_given_out_and_lse(dtype, causal, hq, hkv):
    # Stand-ins for the merged out/lse of a ring step: they belong to a larger softmax, so
    # the block's own recompute would be wrong; the kernel must use the ones it is given.
    q, k, v, dout = make(2, hq, hkv, 48, 16, dtype)
    out = torch.randn_like(q)
    lse = reference(q, k, v, causal, 0.25)[1].to(dtype) + torch.rand(2, hq, 48, dtype=dtype)
    got = kernel_backward(dout, q, k, v, out, lse, causal, 0.25)
    want = reference_backward(dout, q, k, v, out, lse, causal, 0.25)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g, w.to(dtype), **TOL[dtype])


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_backward_adds_into_given_buffers(hq, hkv):
    # Ring attention accumulates each block into (views of) fp32 buffers.
    q, k, v, dout = make(2, hq, hkv, 48, 16, torch.float32)
    out, lse = kernel_forward(q, k, v, False, 0.25)
    want = kernel_backward(dout, q, k, v, out, lse, False, 0.25)
    start = [torch.randn(x.shape[0], x.shape[1], 2 * x.shape[2], x.shape[3]) for x in (q, k, v)]
    views = tuple(x[:, :, 1::2] for x in start)  # strided views, as the ring passes row ranges
    before = [x.clone() for x in views]
    got = kernel_backward(dout, q, k, v, out, lse, False, 0.25, grads=views)
    for g, view, b, w in zip(got, views, before, want):
        assert g is view
        torch.testing.assert_close(view, b + w, **TOL[torch.float32])


def test_strided_inputs():
    # Models hand over transposed views of [B, T, H, D] activations.
    q, k, v, dout = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in make(2, 8, 2, 40, 16, torch.float64))
    out, lse = kernel_forward(q, k, v, True, 0.25)
    ref_out, ref_lse = reference(q, k, v, True, 0.25)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float64])
    got = kernel_backward(dout, q, k, v, out, lse, True, 0.25)
    for g, w in zip(got, reference_backward(dout, q, k, v, ref_out, ref_lse, True, 0.25)):
        torch.testing.assert_close(g, w, **TOL[torch.float64])


def test_rejects_bad_shapes():
    q, k, v, _ = make(1, 6, 4, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        kernel_forward(q, k, v, False, 1.0)
    q, k, v, _ = make(1, 4, 2, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="T == S"):
        kernel_forward(q, k[:, :, :8], v[:, :, :8], True, 1.0)


def test_rejects_mixed_dtypes_devices_and_layouts():
    """The dtype contract: a kernel is never reached with mixed inputs (under CUDA bf16
    autocast QK-norm gave fp32 q/k next to a bf16 v)."""
    q, k, v, dout = make(1, 4, 2, 16, 8, torch.float32)
    out, lse = kernel_forward(q, k, v, True, 1.0)
    mixed = r"one dtype, the run's compute dtype .*q torch.float32, k torch.float32, v torch.bfloat16"
    with pytest.raises(AttentionInputError, match=mixed):
        kernel_forward(q, k, v.bfloat16(), True, 1.0)
    with pytest.raises(AttentionInputError, match=mixed):
        kernel_backward(dout, q, k, v.bfloat16(), out, lse, True, 1.0)
    with pytest.raises(AttentionInputError, match="dout torch.bfloat16"):
        kernel_backward(dout.bfloat16(), q, k, v, out, lse, True, 1.0)
    with pytest.raises(AttentionInputError, match="lse must be torch.float32"):
        kernel_backward(dout, q, k, v, out, lse.double(), True, 1.0)
    with pytest.raises(AttentionInputError, match="one device; got q cpu, k meta"):
        kernel_forward(q, k.to("meta"), v, True, 1.0)
    with pytest.raises(AttentionInputError, match="q has layout torch.strided, strides"):
        kernel_forward(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v, True, 1.0)
    with pytest.raises(AttentionInputError, match="no attention kernel for torch.int32 on cpu"):
        kernel_forward(*(x.int() for x in (q, k, v)), True, 1.0)
    # Ring attention checks before stacking K and V into one message: stack would promote
    # them to fp32 and run fp32 attention with twice the traffic instead of failing.
    with pytest.raises(AttentionInputError, match=mixed):
        ring_forward(q, k, v.bfloat16(), 1.0, group=None)
    with pytest.raises(AttentionInputError, match="out torch.bfloat16"):
        ring_backward(dout, q, k, v, out.bfloat16(), lse, 1.0, group=None)


def test_kernel_by_device_and_dtype():
    assert {kernel_backend("cpu", d) for d in (torch.float64, torch.float32, torch.bfloat16)} == {"cpu"}
    assert kernel_backend("cuda", torch.bfloat16, has_flash_attn=True) == "flash_attn"
    assert kernel_backend("cuda", torch.bfloat16, has_flash_attn=False) == "sdpa_flash"
    assert kernel_backend("cuda", torch.float16, has_flash_attn=False) == "sdpa_flash"
    assert kernel_backend("cuda", torch.float32, has_flash_attn=True) == "efficient"
