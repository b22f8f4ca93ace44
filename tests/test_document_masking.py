"""Document masking: the local kernel and ring attention (cp 1..3, zigzag) equal a
per-document float64 reference, forward and backward."""

import numpy as np
import pytest
import torch
import torch.distributed as dist

from longtrain.attention import documents
from longtrain.attention.documents import document_attention, document_rectangles
from longtrain.attention.kernels import kernel_backward, kernel_forward
from longtrain.attention.ring import ring_attention, ring_backward, ring_forward
from longtrain.parallel.sharding import zigzag_shard
from tests.dist_utils import cp_groups, gather_unshard, run_distributed

SEQ, HEAD_DIM = 48, 8  # 48 splits into 2·cp chunks for cp = 1, 2, 3
HEADS = [(4, 4), (4, 2), (6, 1)]
TOL = dict(rtol=1e-10, atol=1e-10)

# Per batch row: document lengths summing to SEQ. Row 0 of layout "spanning" has a
# document crossing every chunk at cp=3 (chunks of 8); several layouts have documents of
# one token, including first and last.
LAYOUTS = {
    "spanning": [[1, 45, 1, 1], [3, 1, 1, 1, 40, 2]],
    "ones": [[1] * 20 + [28], [47, 1]],
    "single": [[48], [5, 5, 5, 33]],
    "same rows": [[2, 30, 16], [2, 30, 16]],  # one batched kernel call per document
}


def _random_layout(seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(2):
        cuts = np.sort(rng.choice(np.arange(1, SEQ), size=rng.integers(1, 12), replace=False))
        rows.append(np.diff(np.concatenate([[0], cuts, [SEQ]])).tolist())
    return rows


def doc_ids_of(layout: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in layout])


def reference(q, k, v, doc_ids, scale):
    """Plain softmax attention per document, one document at a time, float64."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    rows = []
    for b in range(q.shape[0]):
        parts = []
        for d in doc_ids[b].unique():
            idx = (doc_ids[b] == d).nonzero().squeeze(1)
            qd, kd, vd = q[b][:, idx], k[b][:, idx], v[b][:, idx]
            scores = scale * qd @ kd.transpose(-1, -2)
            causal = torch.ones(len(idx), len(idx), dtype=torch.bool).tril()
            parts.append(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ vd)
        rows.append(torch.cat(parts, dim=1))
    return torch.stack(rows)


def _inputs(hq, hkv, seed):
    gen = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(2, hq, SEQ, HEAD_DIM, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(2, hkv, SEQ, HEAD_DIM, generator=gen, dtype=torch.float64) for _ in range(2))
    return q, k, v, dout


def _cases():
    layouts = list(LAYOUTS.values()) + [_random_layout(s) for s in range(3)]
    return [(layout, heads) for layout in layouts for heads in HEADS]


def _reference_grads(q, k, v, dout, doc_ids):
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    out = reference(*full, doc_ids, HEAD_DIM**-0.5)
    out.backward(dout)
    return [out.detach()] + [x.grad for x in full]


@pytest.mark.parametrize("layout,heads", _cases())
def test_local_document_attention_matches_reference(layout, heads):
    q, k, v, dout = _inputs(*heads, seed=len(layout[0]))
    doc_ids = doc_ids_of(layout)
    want = _reference_grads(q, k, v, dout, doc_ids)
    local = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = document_attention(*local, doc_ids, HEAD_DIM**-0.5)
    out.backward(dout)
    assert torch.isfinite(lse).all()
    for name, got, exp in zip(["out", "dq", "dk", "dv"], [out.detach()] + [x.grad for x in local], want):
        torch.testing.assert_close(got, exp, **TOL, msg=lambda m: f"{name} {layout} {heads}: {m}")


def test_one_document_is_plain_causal_attention():
    from longtrain.attention.kernels import attention

    q, k, v, _ = _inputs(4, 2, seed=0)
    out, lse = document_attention(q, k, v, torch.zeros(2, SEQ, dtype=torch.long), HEAD_DIM**-0.5)
    want_out, want_lse = attention(q, k, v, True, HEAD_DIM**-0.5)
    torch.testing.assert_close(out, want_out, **TOL)
    torch.testing.assert_close(lse, want_lse, **TOL)


def test_rectangles_skip_documents_absent_on_one_side():
    q_docs, k_docs = torch.tensor([0, 0, 2, 2, 2, 5]), torch.tensor([1, 2, 2, 3, 5, 5, 5])
    assert document_rectangles(q_docs, k_docs) == [(2, 5, 1, 3), (5, 6, 4, 7)]
    assert document_rectangles(torch.tensor([0, 1]), torch.tensor([2, 3])) == []
    with pytest.raises(ValueError, match="nondecreasing"):
        document_rectangles(torch.tensor([1, 0]), torch.tensor([0]))


def _sequences(x, cu):
    """Each packed sequence of x [total, H, D] as [1, H, len, D]."""
    return [x[a:b].transpose(0, 1)[None] for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]


def _cpu_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout, scale, causal, *_):
    """flash-attn's varlen forward, one CPU kernel call per packed sequence (lse [H, total])."""
    parts = [kernel_forward(qs, ks, vs, causal, scale) for qs, ks, vs in zip(_sequences(q, cu_q), _sequences(k, cu_k), _sequences(v, cu_k))]
    return torch.cat([o[0].transpose(0, 1) for o, _ in parts]), torch.cat([l[0] for _, l in parts], 1), None, None


def _cpu_varlen_backward(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, dropout, scale, causal, *_):
    """flash-attn's varlen backward, writing into dq, dk, dv as it does."""
    for i, (a, b, c, d) in enumerate(zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist())):
        rows = [x[a:b].transpose(0, 1)[None] for x in (dout, q, out)]
        keys = [x[c:d].transpose(0, 1)[None] for x in (k, v)]
        g = kernel_backward(rows[0], rows[1], *keys, rows[2], lse[None, :, a:b], causal, scale)
        dq[a:b], dk[c:d], dv[c:d] = (x[0].transpose(0, 1) for x in g)


def _emulate_varlen(monkeypatch):
    """Route document masking through the CUDA varlen gather/scatter, with CPU kernels."""
    monkeypatch.setattr(documents, "_uses_varlen", lambda q: True)
    monkeypatch.setattr(documents, "_flash_attn_varlen_forward", _cpu_varlen_forward)
    monkeypatch.setattr(documents, "_flash_attn_varlen_backward", _cpu_varlen_backward)


@pytest.mark.parametrize("layout,heads", _cases()[::2])
def test_varlen_packing_matches_reference(layout, heads, monkeypatch):
    _emulate_varlen(monkeypatch)
    test_local_document_attention_matches_reference(layout, heads)


LAYOUT_GROUPS = {1: [[0], [1], [2]], 2: [[0, 1]], 3: [[0, 1, 2]]}


def _ring_vs_reference(rank, world_size, varlen):
    if varlen:
        _emulate_varlen(pytest.MonkeyPatch())
    for cp, group in cp_groups(rank, world_size, LAYOUT_GROUPS).items():
        r = dist.get_rank(group)
        for layout, heads in _cases():
            q, k, v, dout = _inputs(*heads, seed=len(layout[0]))
            doc_ids = doc_ids_of(layout)
            want = _reference_grads(q, k, v, dout, doc_ids)
            local = [zigzag_shard(x, r, cp, dim=2).requires_grad_() for x in (q, k, v)]
            out = ring_attention(*local, HEAD_DIM**-0.5, group, doc_ids=zigzag_shard(doc_ids, r, cp, dim=1))
            out.backward(zigzag_shard(dout, r, cp, dim=2))
            for name, got, exp in zip(["out", "dq", "dk", "dv"], [out] + [x.grad for x in local], want):
                torch.testing.assert_close(
                    gather_unshard(got, group), exp, **TOL, msg=lambda m: f"{name} cp={cp} {layout} {heads}: {m}"
                )


@pytest.mark.timeout(240)
@pytest.mark.parametrize("varlen", [False, pytest.param(True, marks=pytest.mark.e2e)], ids=["cpu", "varlen"])
def test_ring_document_attention_matches_reference(varlen):
    run_distributed(_ring_vs_reference, 3, varlen, timeout=200)


def test_readme_command_validates(compose_config):
    from longtrain.run_config import load_config

    cfg = load_config(compose_config("preset=cpu_demo", "data.document_masking=true"))
    assert cfg.data.document_masking and not cfg.data.reset_positions


# What would make the host wait for the device inside attention, or gather doc ids.
HOST_SYNCS = {"tolist", "item", "cpu", "numpy", "__bool__", "__int__", "unique_consecutive", "nonzero"}


class _CallLog(torch.overrides.TorchFunctionMode):
    """Names of the torch functions and tensor methods called inside the mode, except
    inside ``kernel`` (an emulated flash-attn call: the real one is one launch)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []
        self.in_kernel = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not self.in_kernel:
            self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))

    def kernel(self, fn):
        def call(*args):
            self.in_kernel = True
            try:
                return fn(*args)
            finally:
                self.in_kernel = False

        return call


def _attention_calls(local, dout, doc_ids, group, varlen):
    """(out and grads, host syncs, collectives) of one ring forward + backward."""
    log, collectives = _CallLog(), []
    with pytest.MonkeyPatch.context() as patch:
        if varlen:
            patch.setattr(documents, "_uses_varlen", lambda q: True)
            patch.setattr(documents, "_flash_attn_varlen_forward", log.kernel(_cpu_varlen_forward))
            patch.setattr(documents, "_flash_attn_varlen_backward", log.kernel(_cpu_varlen_backward))
        for name in ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast"):
            real = getattr(dist, name)
            patch.setattr(dist, name, lambda *a, _n=name, _f=real, **k: collectives.append(_n) or _f(*a, **k))
        # The op's forward and backward themselves: a torch function mode does not reach inside a custom op.
        with log:
            out, lse = ring_forward(*local, HEAD_DIM**-0.5, group, doc_ids)
            grads = ring_backward(dout, *local, out, lse, HEAD_DIM**-0.5, group, doc_ids)
    return [out, *grads], sorted(set(log.names) & HOST_SYNCS), collectives


def _planned_worker(rank, world_size, varlen):
    from longtrain.attention.layout import DocumentLayout, use_layout

    group = dist.new_group([0, 1])
    for layout in list(LAYOUTS.values()) + [_random_layout(7)]:
        q, k, v, dout = _inputs(4, 2, seed=len(layout[0]))
        doc_ids = doc_ids_of(layout)
        local = [zigzag_shard(x, rank, 2, dim=2) for x in (q, k, v)]
        local_docs, local_dout = zigzag_shard(doc_ids, rank, 2, dim=1), zigzag_shard(dout, rank, 2, dim=2)
        # Planned inside attention from the device's doc ids (syncs and a gather), as before layouts:
        today, syncs, collectives = _attention_calls(local, local_dout, local_docs, group, varlen)
        assert "tolist" in syncs and collectives == ["all_gather"] * 2, (syncs, collectives)  # the spies see them
        planned_layout = DocumentLayout.zigzag(doc_ids, rank, 2)  # as the trainer does, before the forward
        planned_layout.prepare(torch.device("cpu"), varlen)
        with use_layout(local_docs, planned_layout):
            planned, syncs, collectives = _attention_calls(local, local_dout, local_docs, group, varlen)
        assert syncs == [] and collectives == [], (layout, syncs, collectives)
        for name, got, want in zip(["out", "dq", "dk", "dv"], planned, today):
            assert torch.equal(got, want), f"{name} {layout}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("varlen", [False, pytest.param(True, marks=pytest.mark.e2e)], ids=["cpu", "varlen"])
def test_planned_layout_has_no_host_sync_or_gather_inside_attention(varlen):
    """Document masking at cp=2 with the micro-batch's layout planned on the host: the
    forward and backward read no doc id from the device and gather none, and give the
    same output and gradients as planning inside attention."""
    run_distributed(_planned_worker, 2, varlen, timeout=100)
