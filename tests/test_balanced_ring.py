"""Ring attention sharded per document (``parallel.cp_load_balancer=documents``): the
layout, its balance on the stdlib corpus, and forward/backward against a float64
single-rank reference at cp = 2, 3, 4."""

import sys
from unittest import mock

import numpy as np
import pytest
import torch
import torch.distributed as dist

from bench.cp_balance import busiest_over_mean, stdlib_document_lengths, window_doc_ids
from longtrain.attention.layout import DocumentLayout, use_layout
from longtrain.attention.ring import ring_attention
from longtrain.parallel.sharding import document_zigzag_index, zigzag_shard
from tests.dist_utils import cp_groups, run_distributed
from tests.test_document_masking import (
    HEAD_DIM, HEADS, LAYOUTS, SEQ, TOL, _emulate_varlen, _inputs, _random_layout, _reference_grads, doc_ids_of,
)

CP_GROUPS = {2: [[0, 1], [2, 3]], 3: [[0, 1, 2]], 4: [[0, 1, 2, 3]]}


@pytest.mark.parametrize("cp", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("layout", [*LAYOUTS.values(), *(_random_layout(s) for s in range(4))])
def test_index_keeps_every_token_once_and_equal_counts(layout, cp):
    doc_ids = doc_ids_of(layout)
    if SEQ % (2 * cp):
        doc_ids = torch.cat([doc_ids, doc_ids[:, : 2 * cp - SEQ % (2 * cp)] + 100], dim=1)
    index = document_zigzag_index(doc_ids, cp)
    assert index.shape == (cp, 2, doc_ids.shape[1] // cp)
    for b in range(2):
        assert sorted(index[:, b].flatten().tolist()) == list(range(doc_ids.shape[1]))
        assert all(index[r, b].diff().gt(0).all() for r in range(cp))  # local order is sequence order


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_one_document_is_zigzag_by_position(cp):
    index = document_zigzag_index(torch.zeros(3, 64, dtype=torch.long), cp)
    for r in range(cp):
        assert torch.equal(index[r], zigzag_shard(torch.arange(64), r, cp, dim=0).expand(3, -1))


def test_balance_on_stdlib_windows():
    """The busiest rank's work over the mean, from the layouts the trainer builds, on
    windows of the stdlib corpus (bench/cp_balance.py prints the full table)."""
    lengths = stdlib_document_lengths()
    for seq_len in (32768, 131072):
        windows = window_doc_ids(lengths, seq_len, 40, seed=1)
        for cp in (2, 4, 8):
            ratios = np.array([busiest_over_mean(d, cp, "documents") for d in windows])
            assert np.median(ratios) <= 1.03 and np.percentile(ratios, 90) <= 1.08, (seq_len, cp, ratios)
        zigzag = [busiest_over_mean(d, 8, "zigzag") for d in windows]
        assert np.median(zigzag) > 1.05  # the windows are the imbalanced kind


def _unshard(local, index, group):
    """The whole sequence [B, H, T, D] from every rank's per-document shard."""
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    B, H, _, D = local.shape
    full = local.new_zeros(B, H, index.shape[0] * index.shape[2], D)
    for part, idx in zip(parts, index):
        full.scatter_(2, idx[:, None, :, None].expand(B, H, -1, D), part)
    return full


def _balanced_vs_reference(rank, world_size, varlen):
    if varlen:
        _emulate_varlen(pytest.MonkeyPatch())
    for cp, group in cp_groups(rank, world_size, CP_GROUPS).items():
        r = dist.get_rank(group)
        for layout in [*LAYOUTS.values(), _random_layout(0)]:
            for heads in HEADS[2:] if varlen else HEADS[1:]:  # the gather/scatter needs one head layout
                q, k, v, dout = _inputs(*heads, seed=len(layout[0]))
                doc_ids = doc_ids_of(layout)
                want = _reference_grads(q, k, v, dout, doc_ids)
                index = document_zigzag_index(doc_ids, cp)
                shard = lambda x: x.gather(2, index[r][:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))  # noqa: E731
                local = [shard(x).requires_grad_() for x in (q, k, v)]
                local_docs = doc_ids.gather(1, index[r])
                with use_layout(local_docs, DocumentLayout.by_documents(doc_ids, index, r)):
                    out = ring_attention(*local, HEAD_DIM**-0.5, group, doc_ids=local_docs)
                    out.backward(shard(dout))
                for name, got, exp in zip(["out", "dq", "dk", "dv"], [out] + [x.grad for x in local], want):
                    torch.testing.assert_close(
                        _unshard(got, index, group), exp, **TOL, msg=lambda m: f"{name} cp={cp} {layout} {heads}: {m}"
                    )


@pytest.mark.timeout(240)
@pytest.mark.parametrize("varlen", [False, pytest.param(True, marks=pytest.mark.e2e)], ids=["cpu", "varlen"])
def test_balanced_ring_matches_reference(varlen):
    """cp = 2, 3, 4 on 4 gloo ranks; layouts include one-token documents (first and last)
    and a document spanning every rank."""
    run_distributed(_balanced_vs_reference, 4, varlen, timeout=200)


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_bench_command_runs(capsys):
    """``python -m bench.cp_balance`` at a small size: the balance table and the timed step."""
    from bench import cp_balance

    with mock.patch.object(sys, "argv", ["cp_balance", "--windows", "3", "--lengths", "4096", "--step", "--step-windows", "1"]):
        cp_balance.main()
    out = capsys.readouterr().out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| 4K")]
    assert len(rows) == 4  # cp = 2, 4, 8 and the step
    assert all(float(x) > 0 for x in rows[-1][2:5])
