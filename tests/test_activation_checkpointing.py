"""Activation checkpointing (model.activation_checkpointing): checkpointed blocks give the
loss and gradients of plain ones, recompute what they should, and under context
parallelism never run the ring's P2P exchanges or Ulysses' all-to-alls again."""

import contextlib
import functools
from collections import Counter
from pathlib import Path
from typing import Iterator
from unittest import mock

import pytest
import torch

from longtrain.attention import ring, ulysses
from longtrain.config import AC_MODES, ConfigError, ModelConfig, RopeConfig
from longtrain.model import transformer
from longtrain.model.transformer import Transformer
from longtrain.parallel.activation_checkpointing import apply_activation_checkpointing
from longtrain.parallel.mesh import ParallelDims, init_parallel
from longtrain.parallel.parallelize import apply_compile
from longtrain.parallel.sharding import zigzag_positions, zigzag_shard
from longtrain.trainer.builder import build_model
from tests.dist_utils import run_distributed

TOL = dict(rtol=0, atol=1e-6)  # fp32, as the issue asks
SEQ, VOCAB = 48, 259


@contextlib.contextmanager
def counting(mlp: bool = True) -> Iterator[Counter]:
    """Count attention forwards (ring or Ulysses), P2P exchanges, all-to-all rounds and
    (``mlp``) MLP forwards, the recomputed part.

    Compiled blocks need ``mlp=False``: dynamo replays a traced function's mutation of
    the counter after the graph ran, which would overwrite what the attention op (run
    eagerly inside the graph) counted meanwhile.
    """
    calls = Counter()

    def wrap(name, fn):
        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return counted

    with contextlib.ExitStack() as patches:
        patches.enter_context(mock.patch.object(ring, "ring_forward", wrap("attention", ring.ring_forward)))
        patches.enter_context(mock.patch.object(ring._Ring, "exchange", wrap("p2p", ring._Ring.exchange)))
        patches.enter_context(mock.patch.object(ulysses, "ulysses_forward", wrap("attention", ulysses.ulysses_forward)))
        patches.enter_context(mock.patch.object(ulysses, "_all_to_all", wrap("all_to_all", ulysses._all_to_all)))
        if mlp:
            patches.enter_context(mock.patch.object(transformer.FeedForward, "forward", wrap("mlp", transformer.FeedForward.forward)))
        yield calls


def loss_and_grads(model, ids, pos, labels, docs=None, tokens=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    sums = model(ids, pos, labels, 16, docs, z_loss=1e-4)
    loss = sums.objective / (sums.tokens if tokens is None else tokens)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name] = g.detach().clone()
    return loss.detach(), grads


def assert_same(got, want) -> None:
    (loss, grads), (ref_loss, ref_grads) = got, want
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=name)


def _run_model(mode: str, documents: bool, mlp_tile_tokens: int = 0, compile: bool = False):
    torch.manual_seed(0)
    cfg = ModelConfig(
        dim=64, n_layers=3, n_heads=4, n_kv_heads=2, activation_checkpointing=mode, mlp_tile_tokens=mlp_tile_tokens
    )
    model = Transformer(cfg, RopeConfig(), VOCAB)
    apply_activation_checkpointing(model.layers, mode)
    if compile:
        apply_compile(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    docs = torch.repeat_interleave(torch.tensor([0, 1, 2]), torch.tensor([10, 30, 8]))[None].expand(2, -1) if documents else None
    with counting(mlp=not compile) as calls:
        result = loss_and_grads(model, ids, torch.arange(SEQ)[None].expand(2, -1), ids, docs)
    return result, calls


@pytest.mark.parametrize("documents", [False, True])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointed_matches_plain_at_cp1(mode, documents):
    plain, plain_calls = _run_model("none", documents)
    checkpointed, calls = _run_model(mode, documents)
    assert_same(checkpointed, plain)
    # The blocks are recomputed in the backward (the MLP runs twice per layer), the
    # attention op is not: its output is saved.
    assert plain_calls == {"attention": 3, "mlp": 3}
    assert calls == {"attention": 3, "mlp": 6}


@pytest.mark.parametrize("mode", AC_MODES)
def test_sequence_tiled_mlp_matches_whole(mode):
    plain, _ = _run_model("none", documents=False)
    swiglu = transformer.FeedForward._swiglu
    tile_lengths = []

    def recording(self, x):
        tile_lengths.append(x.shape[1])
        return swiglu(self, x)

    with mock.patch.object(transformer.FeedForward, "_swiglu", recording):
        tiled, _ = _run_model(mode, documents=False, mlp_tile_tokens=20)
    assert_same(tiled, plain)
    # 48 tokens in tiles of 20: the MLP never sees more than a tile, forward or recompute.
    assert set(tile_lengths) == {20, 8} and max(tile_lengths) == 20


def checkpoint_mode(block: torch.nn.Module) -> str:
    """The mode ``apply_activation_checkpointing`` wrapped a block's forward with ("none": not wrapped)."""
    return block.forward.args[0] if isinstance(block.forward, functools.partial) else "none"


def test_config_key_reaches_every_block(compose_config):
    from longtrain.run_config import load_config

    for mode in AC_MODES:
        # The README's command line.
        cfg = load_config(compose_config("preset=cpu_demo", f"model.activation_checkpointing={mode}", "model.mlp_tile_tokens=2048"))
        model = build_model(cfg, VOCAB, ParallelDims(1, 1, 0, 1, torch.device("cpu")))
        assert [checkpoint_mode(b) for b in model.layers] == [mode] * cfg.model.n_layers
        assert [b.feed_forward.tile_tokens for b in model.layers] == [2048] * cfg.model.n_layers
    with pytest.raises(ConfigError, match="model.activation_checkpointing: unknown value 'some'; valid: none, full, selective"):
        load_config(compose_config("model=tiny", "model.activation_checkpointing=some"))
    with pytest.raises(ConfigError, match=r"model.mlp_tile_tokens: must be >= 0 \(0 = no tiling\), got -1"):
        load_config(compose_config("model=tiny", "model.mlp_tile_tokens=-1"))


def _cp2_worker(rank: int, world_size: int, tmp: str, method: str) -> None:
    from tests.test_parallel_training import make_config

    results = {}
    for mode in AC_MODES:
        extra = (f"model.activation_checkpointing={mode}", f"parallel.cp_method={method}")
        cfg = make_config(Path(tmp) / mode, cp=2, extra=extra)
        pd = init_parallel(cfg.parallel, torch.device("cpu"))
        torch.manual_seed(0)
        model = build_model(cfg, VOCAB, pd)  # ring attention + FSDP2 + checkpointing
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, VOCAB, (2, SEQ), generator=g)
        docs = torch.repeat_interleave(torch.tensor([0, 1, 2]), torch.tensor([10, 30, 8]))[None].expand(2, -1)
        local = [zigzag_shard(x, pd.cp_rank, 2) for x in (ids, docs)]
        pos = zigzag_positions(SEQ, pd.cp_rank, 2)[None].expand(2, -1)
        with counting() as calls:
            results[mode] = loss_and_grads(model, local[0], pos, local[0], local[1], tokens=ids.numel())
        results[mode + "_calls"] = calls
    for mode in ("full", "selective"):
        assert_same(results[mode], results["none"])
        calls, plain = results[mode + "_calls"], results["none_calls"]
        if method == "ring":  # per layer the forward posts cp−1 K/V hops, the backward cp−1 K/V and cp dK/dV
            assert plain["p2p"] == 2 * (1 + 1 + 2) and plain["all_to_all"] == 0
        else:  # per layer: q/k/v in and out back, then dout in and dq/dk/dv back; no ring at U = cp
            assert plain["all_to_all"] == 2 * (2 + 2) and plain["p2p"] == 0
        assert calls["p2p"] == plain["p2p"] and calls["all_to_all"] == plain["all_to_all"]
        assert calls["attention"] == plain["attention"] == 2
        assert calls["mlp"] == 2 * plain["mlp"]  # the rest of the block is recomputed


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["ring", "ulysses"])
def test_checkpointed_matches_plain_at_cp2_without_rerunning_attention(tmp_path, method):
    run_distributed(_cp2_worker, 2, str(tmp_path), method)
