import pytest
import torch
import torch.distributed as dist

from longtrain.attention.kernels import attention
from longtrain.attention.ring import ring_attention, ring_forward
from longtrain.parallel.sharding import zigzag_positions, zigzag_shard, zigzag_unshard
from tests.dist_utils import cp_groups, gather_unshard, run_distributed

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}
WORLD = 4
# cp groups carved out of 4 ranks, every rank building all of them in the same order.
# cp=2 and cp=3 include groups that do not start at global rank 0 (the dp×cp mesh case).
LAYOUTS = {1: [[0], [1], [2], [3]], 2: [[0, 1], [2, 3]], 3: [[1, 2, 3]], 4: [list(range(WORLD))]}
HEADS = [(4, 4), (4, 2), (4, 1)]
SEQ, BATCH, HEAD_DIM = 48, 2, 16  # 48 splits into 2·cp chunks for cp = 1..4


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_zigzag_round_trip_and_positions(cp):
    x = torch.arange(2 * SEQ * 3).view(2, SEQ, 3)
    shards = [zigzag_shard(x, r, cp) for r in range(cp)]
    assert torch.equal(zigzag_unshard(shards, cp), x)
    assert torch.equal(zigzag_unshard(torch.cat(shards, 1), cp), x)  # all-gathered form
    c = SEQ // (2 * cp)
    for r in range(cp):
        pos = zigzag_positions(SEQ, r, cp)
        assert pos.dtype == torch.int64
        assert pos.tolist() == list(range(r * c, (r + 1) * c)) + list(range((2 * cp - 1 - r) * c, (2 * cp - r) * c))
        assert torch.equal(shards[r], x[:, pos])
    assert torch.equal(torch.cat([zigzag_positions(SEQ, r, cp) for r in range(cp)]).sort().values, torch.arange(SEQ))


def test_zigzag_rejects_indivisible_length():
    with pytest.raises(ValueError, match=r"50.*6"):
        zigzag_shard(torch.zeros(1, 50), 0, 3)
    with pytest.raises(ValueError, match=r"30.*8"):
        zigzag_positions(30, 0, 4)


def _ring_vs_single_rank(rank, world_size):
    for cp, group in cp_groups(rank, world_size, LAYOUTS).items():
        r = dist.get_rank(group)
        for seed, ((hq, hkv), dtype) in enumerate((h, d) for h in HEADS for d in (torch.float64, torch.float32)):
            gen = torch.Generator().manual_seed(seed)  # the same full sequence on every rank
            q, dout = (torch.randn(BATCH, hq, SEQ, HEAD_DIM, generator=gen, dtype=dtype) for _ in range(2))
            k, v = (torch.randn(BATCH, hkv, SEQ, HEAD_DIM, generator=gen, dtype=dtype) for _ in range(2))
            scale = HEAD_DIM**-0.5

            full = [x.clone().requires_grad_() for x in (q, k, v)]
            ref_out, ref_lse = attention(*full, causal=True, scale=scale)
            ref_out.backward(dout)

            local = [zigzag_shard(x, r, cp, dim=2).requires_grad_() for x in (q, k, v)]
            out = ring_attention(*local, scale, group)
            out.backward(zigzag_shard(dout, r, cp, dim=2))
            _, lse = ring_forward(*(x.detach() for x in local), scale, group)

            pairs = [(out, ref_out), (lse, ref_lse)] + [(x.grad, y.grad) for x, y in zip(local, full)]
            for name, (got, want) in zip(["out", "lse", "dq", "dk", "dv"], pairs):
                assert got.dtype == want.dtype, name
                torch.testing.assert_close(
                    gather_unshard(got, group), want.detach(), **TOL[dtype],
                    msg=lambda m: f"{name} cp={cp} heads={hq}/{hkv} {dtype}: {m}",
                )
            if seed == 0:  # a loss that sums the output hands the ring an expanded (stride 0) gradient
                summed, ones = ([x.detach().clone().requires_grad_() for x in local] for _ in range(2))
                ring_attention(*summed, scale, group).sum().backward()
                out = ring_attention(*ones, scale, group)
                out.backward(torch.ones_like(out))
                for x, y in zip(summed, ones):
                    torch.testing.assert_close(x.grad, y.grad, **TOL[dtype])


@pytest.mark.timeout(180)
def test_ring_matches_single_rank():
    # One spawn covers every cp size through sub-groups: spawning ranks is the slow part.
    run_distributed(_ring_vs_single_rank, WORLD, timeout=150)


def test_local_ring_op_takes_an_expanded_output_gradient():
    """A loss that sums the output hands the backward an expanded (stride 0) gradient; the
    kernels need a contiguous last dimension, so the autograd entries make one (cp > 1:
    test_ring_matches_single_rank)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 32, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 32, 16, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    ring_attention(q, k, v, 0.25, None).sum().backward()
    got = [t.grad for t in (q, k, v)]
    ref_q, ref_k, ref_v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref_out = attention(ref_q, ref_k, ref_v, causal=True, scale=0.25)[0]
    ref_out.backward(torch.ones_like(ref_out))
    for g, t in zip(got, (ref_q, ref_k, ref_v)):
        torch.testing.assert_close(g, t.grad, **TOL[torch.float64])
    docs = torch.tensor([[0] * 12 + [1] * 20])  # the document-masked path
    for x in (q, k, v):
        x.grad = None
    ring_attention(q, k, v, 0.25, None, docs).sum().backward()
    got = [t.grad for t in (q, k, v)]
    for t in (ref_q, ref_k, ref_v):
        t.grad = None
    ref_out = ring_attention(ref_q, ref_k, ref_v, 0.25, None, docs)
    ref_out.backward(torch.ones_like(ref_out))
    for g, t in zip(got, (ref_q, ref_k, ref_v)):
        torch.testing.assert_close(g, t.grad, **TOL[torch.float64])
