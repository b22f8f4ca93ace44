"""Ulysses and Ulysses × ring (hybrid) attention equal a single-rank float64 reference,
forward and backward, with GQA (K/V replicated past the KV heads), MQA and documents; a
planned layout needs no doc-id gather and no host sync; bf16 errors do not grow with
the degree."""

import pytest
import torch
import torch.distributed as dist

from longtrain.attention.layout import DocumentLayout, use_layout
from longtrain.attention.ring import ring_attention
from longtrain.attention.ulysses import ulysses_attention, ulysses_backward, ulysses_forward
from longtrain.parallel.sharding import zigzag_shard, zigzag_unshard
from tests.dist_utils import cp_groups, gather_unshard, run_distributed
from tests.test_document_masking import (
    HEAD_DIM, HOST_SYNCS, LAYOUTS, TOL, _CallLog, _inputs, _reference_grads, doc_ids_of,
)

SEQ = 48  # test_document_masking's layouts; 2·cp = 8 chunks of 6 at cp = 4
HEADS = [(8, 2), (8, 1)]  # GQA (replicated at U = 4) and MQA (replicated at U = 2 and 4)
DOCS = [None, LAYOUTS["spanning"], LAYOUTS["ones"]]  # one-token documents, a document over every chunk


@pytest.mark.parametrize("ulysses,ring", [(2, 2), (2, 3), (3, 2), (4, 2)])
def test_ulysses_groups_of_a_zigzag_hold_the_coarse_zigzag_pairs(ulysses, ring):
    """cp = U·R ranks p = jU + u sharded by plain zigzag: group j's shards, put in order
    (first halves by u, second halves by u reversed), are the zigzag shard j over R."""
    cp = ulysses * ring
    tokens = torch.arange(4 * cp * 3)[None]
    for j in range(ring):
        pieces = [zigzag_shard(tokens, j * ulysses + u, cp) for u in range(ulysses)]
        assert torch.equal(zigzag_unshard(pieces, ulysses), zigzag_shard(tokens, j, ring))


# On 4 ranks: Ulysses over pairs and over all four, and 2 (Ulysses) × 2 (ring).
METHODS = {
    "ulysses2": ({2: [[0, 1], [2, 3]]}, None),
    "ulysses4": ({4: [[0, 1, 2, 3]]}, None),
    "hybrid2x2": ({2: [[0, 1], [2, 3]]}, {2: [[0, 2], [1, 3]]}),
}


def _groups(rank, world_size, method):
    ulysses, ring = METHODS[method]
    (u_group,) = cp_groups(rank, world_size, ulysses).values()
    r_group = None if ring is None else next(iter(cp_groups(rank, world_size, ring).values()))
    return u_group, r_group


def _cp_rank_and_size(rank, method):
    """This rank's place in the zigzag the model's inputs are sharded by (its cp group)."""
    ulysses, ring = METHODS[method]
    cp = next(iter(ulysses)) * (1 if ring is None else next(iter(ring)))
    return rank % cp, cp


def _vs_reference(rank, world_size):
    for method in METHODS:
        u_group, r_group = _groups(rank, world_size, method)
        p, cp = _cp_rank_and_size(rank, method)
        cp_group = dist.group.WORLD if cp == world_size else u_group
        for layout in DOCS:
            for heads in HEADS:
                q, k, v, dout = _inputs(*heads, seed=3)
                doc_ids = torch.zeros(2, SEQ, dtype=torch.long) if layout is None else doc_ids_of(layout)
                want = _reference_grads(q, k, v, dout, doc_ids)
                local = [zigzag_shard(x, p, cp, dim=2).requires_grad_() for x in (q, k, v)]
                docs = None if layout is None else zigzag_shard(doc_ids, p, cp, dim=1)
                out = ulysses_attention(*local, HEAD_DIM**-0.5, u_group, r_group, doc_ids=docs)
                out.backward(zigzag_shard(dout, p, cp, dim=2))
                for name, got, exp in zip(["out", "dq", "dk", "dv"], [out] + [x.grad for x in local], want):
                    torch.testing.assert_close(
                        gather_unshard(got, cp_group), exp, **TOL, msg=lambda m: f"{name} {method} {layout} {heads}: {m}"
                    )


def _calls(local, dout, docs, u_group, r_group):
    """(out and grads, host syncs, doc-id gathers) of one forward + backward."""
    log, gathers = _CallLog(), []
    with pytest.MonkeyPatch.context() as patch:
        real = dist.all_gather
        patch.setattr(dist, "all_gather", lambda *a, **k: gathers.append(1) or real(*a, **k))
        with log:
            out, head_side = ulysses_forward(*local, HEAD_DIM**-0.5, u_group, r_group, docs)
            grads = ulysses_backward(dout, head_side, HEAD_DIM**-0.5, u_group, r_group, docs, local[1].shape[1])
    return [out, *grads], sorted(set(log.names) & HOST_SYNCS), len(gathers)


def _planned_worker(rank, world_size):
    for method in ("ulysses4", "hybrid2x2"):
        u_group, r_group = _groups(rank, world_size, method)
        ring_rank, ring_size = (0, 1) if r_group is None else (dist.get_rank(r_group), dist.get_world_size(r_group))
        q, k, v, dout = _inputs(8, 2, seed=1)
        doc_ids = doc_ids_of(LAYOUTS["spanning"])
        local = [zigzag_shard(x, rank, 4, dim=2) for x in (q, k, v)]
        docs, local_dout = zigzag_shard(doc_ids, rank, 4, dim=1), zigzag_shard(dout, rank, 4, dim=2)
        gathered, syncs, gathers = _calls(local, local_dout, docs, u_group, r_group)
        assert "tolist" in syncs and gathers > 0  # the spies see the unplanned path's
        with use_layout(docs, DocumentLayout.zigzag(doc_ids, ring_rank, ring_size)):  # as the trainer does
            planned, syncs, gathers = _calls(local, local_dout, docs, u_group, r_group)
        assert syncs == [] and gathers == 0, (method, syncs, gathers)
        for name, got, want in zip(["out", "dq", "dk", "dv"], planned, gathered):
            assert torch.equal(got, want), f"{name} {method}"


def _worker(rank, world_size):
    _vs_reference(rank, world_size)
    _planned_worker(rank, world_size)


@pytest.mark.timeout(150)
def test_ulysses_and_hybrid_match_reference_and_planned_layouts_need_no_gather():
    """One spawn of 4 ranks for both checks: forward and gradients against the float64
    reference (doc ids gathered and planned inside attention), then the planned layout."""
    run_distributed(_worker, 4, timeout=140)


# bf16 at degree 8 against degree 2, every method: 8 ranks, one sequence of 64 tokens.
BF16_GROUPS = {
    "ring": {2: [[0, 1], [2, 3], [4, 5], [6, 7]], 8: [list(range(8))]},
    "ulysses": {2: [[0, 1], [2, 3], [4, 5], [6, 7]], 8: [list(range(8))]},
    # Ulysses over pairs; the ring over one rank (degree 2 = 2 × 1) or over four (8 = 2 × 4).
    "hybrid": {2: [[r] for r in range(8)], 8: [[0, 2, 4, 6], [1, 3, 5, 7]]},
}


def _bf16_error(rank, world_size, out_file):
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, h, 64, HEAD_DIM, generator=gen).bfloat16() for h in (8, 2, 2, 8))
    want = _reference_grads(*(x.double() for x in (q, k, v, dout)), torch.zeros(1, 64, dtype=torch.long))
    pairs = next(iter(cp_groups(rank, world_size, {2: BF16_GROUPS["ring"][2]}).values()))
    errors = {}
    for method, layouts in BF16_GROUPS.items():
        for degree, group in cp_groups(rank, world_size, layouts).items():
            cp, cp_group = degree, dist.group.WORLD if degree == 8 else pairs
            p = dist.get_rank(cp_group)
            local = [zigzag_shard(x, p, cp, dim=2).requires_grad_() for x in (q, k, v)]
            if method == "ring":
                out = ring_attention(*local, HEAD_DIM**-0.5, group)
            elif method == "ulysses":
                out = ulysses_attention(*local, HEAD_DIM**-0.5, group)
            else:
                out = ulysses_attention(*local, HEAD_DIM**-0.5, pairs, group)
            out.backward(zigzag_shard(dout, p, cp, dim=2))
            got = [gather_unshard(x, cp_group).double() for x in [out] + [x.grad for x in local]]
            errors[method, degree] = max(float((g - w).abs().max() / w.abs().max()) for g, w in zip(got, want))
    if rank == 0:
        torch.save(errors, out_file)


@pytest.mark.timeout(120)
@pytest.mark.e2e
def test_bf16_error_does_not_grow_with_degree(tmp_path):
    run_distributed(_bf16_error, 8, str(tmp_path / "errors.pt"), timeout=110)
    errors = torch.load(tmp_path / "errors.pt")
    for method in BF16_GROUPS:
        assert errors[method, 8] <= 1.5 * errors[method, 2], (method, errors)

