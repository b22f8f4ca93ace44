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


def test_chunked_loss_matches_naive_value_and_grads():
    torch.manual_seed(0)
    h = torch.randn(2, 37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (2, 37))
    labels[0, :5] = IGNORE_INDEX
    ref = naive_loss(h, w, labels, 1e-4)
    ref_gh, ref_gw = torch.autograd.grad(ref, (h, w))

    for chunk in (1, 8, 37, 100):  # uneven, exact and larger-than-sequence chunks
        sums = chunked_cross_entropy(h.float().double(), w, labels, chunk)
        loss = total_loss(sums, 1e-4, sums.tokens)
        gh, gw = torch.autograd.grad(loss, (h, w))
        assert int(sums.tokens) == 2 * 37 - 5
        torch.testing.assert_close(loss, ref.float(), rtol=1e-6, atol=1e-6, check_dtype=False)
        torch.testing.assert_close(gh, ref_gh, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gw, ref_gw, rtol=1e-6, atol=1e-6)


def test_z_loss_is_palm_form():
    h = torch.randn(1, 4, 8)
    w = torch.randn(10, 8)
    labels = torch.randint(0, 10, (1, 4))
    sums = chunked_cross_entropy(h, w, labels, 2)
    log_z = torch.logsumexp((h @ w.t()).reshape(-1, 10), -1)
    torch.testing.assert_close(sums.z, (log_z**2).sum())
    assert torch.allclose(total_loss(sums, 0.0, 4), sums.ce / 4)
