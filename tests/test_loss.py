import pytest
import torch
import torch.nn.functional as F

from longtrain.optim.loss import IGNORE_INDEX, chunked_cross_entropy, total_loss


def naive_loss(h, w, labels, z_coef):
    logits = h.reshape(-1, h.shape[-1]) @ w.t()
    y = labels.reshape(-1)
    valid = y != IGNORE_INDEX
    ce = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
    z = (torch.logsumexp(logits, -1)[valid] ** 2).sum()
    return (ce + z_coef * z) / valid.sum()


def _inputs(dtype=torch.float64):
    torch.manual_seed(0)
    h = torch.randn(2, 37, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(50, 16, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 50, (2, 37))
    labels[0, :5] = IGNORE_INDEX
    labels[1, -1] = IGNORE_INDEX
    return h, w, labels


@pytest.mark.parametrize("z_coef", [0.0, 1e-4, 0.5])
def test_fused_loss_matches_float64_reference_value_and_grads(z_coef):
    h, w, labels = _inputs()
    ref = naive_loss(h, w, labels, z_coef)
    ref_gh, ref_gw = torch.autograd.grad(ref, (h, w))

    for chunk in (1, 8, 37, 100):  # uneven, exact and larger-than-sequence chunks
        sums = chunked_cross_entropy(h, w, labels, chunk, z_coef)
        loss = total_loss(sums, sums.tokens)
        gh, gw = torch.autograd.grad(loss, (h, w))
        assert int(sums.tokens) == 2 * 37 - 6
        torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10, check_dtype=False)
        torch.testing.assert_close(gh, ref_gh, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gw, ref_gw, rtol=1e-10, atol=1e-10)


def test_fused_loss_fp32_within_1e6_of_float64():
    h, w, labels = _inputs()
    ref = naive_loss(h, w, labels, 1e-4)
    ref_gh, ref_gw = torch.autograd.grad(ref, (h, w))
    h32, w32 = (t.detach().float().requires_grad_() for t in (h, w))
    sums = chunked_cross_entropy(h32, w32, labels, 8, 1e-4)
    loss = total_loss(sums, sums.tokens)
    gh, gw = torch.autograd.grad(loss, (h32, w32))
    assert gh.dtype == gw.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh.double(), ref_gh, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gw.double(), ref_gw, rtol=1e-6, atol=1e-6)


def test_gradient_is_scaled_by_the_incoming_gradient_and_flows_through_tied_use():
    """The backward multiplies the forward's gradient by what arrives (a loss scale, a
    division by the global token count) and adds to other uses of the same weight."""
    h, w, labels = _inputs()
    ref = 3.5 * naive_loss(h, w, labels, 1e-4) + (w**2).sum()
    ref_gh, ref_gw = torch.autograd.grad(ref, (h, w))
    sums = chunked_cross_entropy(h, w, labels, 8, 1e-4)
    gh, gw = torch.autograd.grad(3.5 * total_loss(sums, sums.tokens) + (w**2).sum(), (h, w))
    torch.testing.assert_close(gh, ref_gh, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-10, atol=1e-10)


def test_logged_sums_are_detached_and_equal_the_objective_parts():
    h, w, labels = _inputs()
    sums = chunked_cross_entropy(h, w, labels, 8, 0.25)
    assert not sums.ce.requires_grad and not sums.z.requires_grad and sums.objective.requires_grad
    torch.testing.assert_close(sums.objective, sums.ce + 0.25 * sums.z)
    with torch.no_grad():  # evaluation takes the path without gradients: the same sums
        ev = chunked_cross_entropy(h, w, labels, 8, 0.25)
    torch.testing.assert_close(ev.ce, sums.ce)
    torch.testing.assert_close(ev.z, sums.z)


def test_bf16_autocast_matches_the_unfused_projection():
    """Under autocast the projection runs in bf16 as it would outside the fused loss; the
    result is close to fp32, gradients come back in the inputs' dtypes."""
    h, w, labels = _inputs(torch.float32)
    ref = naive_loss(h, w, labels, 1e-4)
    ref_gh, ref_gw = torch.autograd.grad(ref, (h, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sums = chunked_cross_entropy(h, w, labels, 8, 1e-4)
    gh, gw = torch.autograd.grad(total_loss(sums, sums.tokens), (h, w))
    assert gh.dtype == gw.dtype == torch.float32
    torch.testing.assert_close(total_loss(sums, sums.tokens), ref, rtol=2e-2, atol=2e-2)
    assert F.cosine_similarity(gh.flatten(), ref_gh.flatten(), dim=0) > 0.999
    assert F.cosine_similarity(gw.flatten(), ref_gw.flatten(), dim=0) > 0.999


def test_z_loss_is_palm_form():
    h = torch.randn(1, 4, 8)
    w = torch.randn(10, 8)
    labels = torch.randint(0, 10, (1, 4))
    sums = chunked_cross_entropy(h, w, labels, 2)
    log_z = torch.logsumexp((h @ w.t()).reshape(-1, 10), -1)
    torch.testing.assert_close(sums.z, (log_z**2).sum())
    assert torch.allclose(total_loss(sums, 4), sums.ce / 4)
