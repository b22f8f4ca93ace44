"""bench/memory.py and bench/throughput.py: the bisection, the fitted exponent, and short
real runs of the commands the README shows."""

import math
import sys
from unittest import mock

import pytest
import torch

from bench import memory, throughput


def _linear_step(per_1k_gb: float, calls: list[int]):
    """A stand-in for measure(): a step that needs ``per_1k_gb`` per 1,024 tokens."""

    def fake(impl, seq_len, steps, max_gb, **kw):
        calls.append(seq_len)
        if seq_len > 40 * 1024:  # past the address-space cap: the step did not run
            return throughput.Result(None, None, 5.0, 0.3)
        return throughput.Result(1.0, 1.0, 0.3 + per_1k_gb * seq_len / 1024, 0.3)

    return fake


def test_longest_bisects_to_the_last_length_that_fits():
    calls = []
    with mock.patch.object(memory, "measure", _linear_step(0.1, calls)):
        n, probes = memory.longest("full", cap_gb=1.05, granule=1024, limit=1 << 20)
    assert n == 10 * 1024  # 10 × 0.1 GB fits, 11 × 0.1 does not
    assert calls == [1024 * k for k in (1, 2, 4, 8, 16, 12, 10, 11)]  # doubling, then bisection
    with mock.patch.object(memory, "measure", _linear_step(0.001, [])):
        assert memory.longest("full", cap_gb=1.0, granule=1024, limit=1 << 20)[0] == 40 * 1024  # cap stops it
        assert memory.longest("full", cap_gb=1.0, granule=1024, limit=5000)[0] == 4 * 1024  # the limit does
    with mock.patch.object(memory, "measure", _linear_step(2.0, [])):
        assert memory.longest("full", cap_gb=1.0, granule=1024, limit=1 << 20)[0] == 0


@pytest.mark.parametrize("impl", ["hf", "none"])
def test_stub_attention_replaces_the_kernel(impl):
    """``--attention stub`` times the rest of the step only if the kernel is really gone on
    that side: the same seed gives another loss. k and v still get gradients, so their
    projections' backward is in the timed step as it is with the kernel."""
    ids, pos = throughput._batch(throughput.BYTE_VOCAB, 64)
    losses = {}
    for attention in throughput.ATTENTION:
        torch.manual_seed(0)
        model, loss_fn = throughput._build(impl, throughput.BYTE_VOCAB, 2048, 0, 256, attention)
        loss = loss_fn(ids, pos)
        loss.backward()
        losses[attention] = loss.item()
        kv_grads = [p.grad for name, p in model.named_parameters() if name.endswith(("k_proj.weight", "v_proj.weight",
                                                                                     "wk.weight", "wv.weight"))]
        assert len(kv_grads) == 8 and all(g is not None and g.abs().sum() > 0 for g in kv_grads)
    assert losses["kernel"] != pytest.approx(losses["stub"], rel=1e-4)


def test_loglog_slope():
    xs = [8192, 16384, 32768, 131072]
    assert memory.loglog_slope(xs, [3 * x for x in xs]) == pytest.approx(1.0)
    assert memory.loglog_slope(xs, [x**2 for x in xs]) == pytest.approx(2.0)
    assert memory.loglog_slope(xs, [0.3 + 1e-5 * x for x in xs]) < 1.0  # a constant flattens it
    assert not math.isnan(memory.loglog_slope(xs, [1.0] * 4))


@pytest.mark.e2e
def test_memory_scaling_command_runs(capsys):
    with mock.patch.object(sys, "argv", ["memory", "scaling", "--impls", "full_tiled", "--mlp-tile", "128",
                                         "--seq-lens", "256", "512", "--doc-len", "128"]):
        memory.main()
    out = capsys.readouterr().out
    assert "full_tiled     512" in out and "fitted exponent" in out


@pytest.mark.e2e
def test_throughput_command_runs_per_vocabulary(capsys):
    # Fresh processes measure each implementation's peak: one per implementation and vocabulary.
    with mock.patch.object(sys, "argv", ["throughput", "--seq-lens", "256", "--impls", "hf", "none",
                                         "--steps", "1", "--vocabs", "259", "1000"]):
        throughput.main()
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [(r[0], r[2]) for r in rows] == [(v, i) for v in ("259", "1000") for i in ("hf", "none")]
    assert all(float(r[3]) > 0 and float(r[4]) > 0 and float(r[5]) > 0 for r in rows)  # CPU s, tok/cpu-s, peak GB


@pytest.mark.e2e
def test_throughput_command_runs_compiled_with_stub_attention(capsys):
    with mock.patch.object(sys, "argv", ["throughput", "--seq-lens", "256", "--impls", "hf_compiled", "compiled",
                                         "--steps", "1", "--attention", "stub"]):
        throughput.main()
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [r[2] for r in rows] == ["hf_compiled", "compiled"] and all(float(r[4]) > 0 for r in rows)
