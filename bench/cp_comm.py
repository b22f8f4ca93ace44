"""Bytes each rank sends for attention in one forward+backward, counted, against the
planner's formula (``longtrain/plan_comm.py``), for the ring, Ulysses and the hybrid.

Gloo ranks on the CPU (fp32: 4 bytes an element), a two-layer model, one micro-batch. The
count wraps ``dist.isend`` (the ring's hops) and ``dist.all_to_all`` (Ulysses; a rank's
own piece is not sent). Printed per method and model: counted, predicted, equal or not.

    python -m bench.cp_comm [--seq 256]
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from typing import Callable
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longtrain.attention.ring import ring_attention
from longtrain.attention.ulysses import ulysses_attention
from longtrain.config import ModelConfig, RopeConfig
from longtrain.model.transformer import Transformer
from longtrain.parallel.sharding import zigzag_positions, zigzag_shard
from longtrain.plan_comm import AttentionShape, layer_traffic

# (method, Ulysses degree U, ring degree R): world = U × R ranks.
METHODS = [("ring", 1, 2), ("ulysses", 2, 1), ("hybrid", 2, 2), ("ring", 1, 4), ("ulysses", 4, 1)]
MODELS = {"GQA 4:2": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16),
          "MQA 4:1": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=16)}
VOCAB = 256


def predicted_bytes(model: ModelConfig, seq_len: int, ulysses: int, ring: int, elem: int = 4) -> int:
    """The planner's bytes one rank sends for attention in one forward+backward."""
    shape = AttentionShape(1, seq_len, model.resolved_head_dim(), model.n_heads, model.n_kv_heads, model.n_layers, elem)
    t = layer_traffic(shape, ulysses, ring)
    return model.n_layers * (t.ring_forward + t.ring_backward + t.a2a_forward + t.a2a_backward)


def _attention(method: str, ulysses: int, ring: int, rank: int) -> Callable:
    """The attention function of ``method`` on ranks 0..U·R−1. Every rank calls it, in the
    same order: it builds the groups (``new_group`` is collective)."""
    if method != "hybrid":
        ranks = list(range(ulysses * ring))
        group = dist.group.WORLD if len(ranks) == dist.get_world_size() else dist.new_group(ranks)
        if method == "ring":
            return functools.partial(ring_attention, group=group)
        return functools.partial(ulysses_attention, ulysses_group=group, ring_group=None)
    # Ulysses over neighbouring ranks jU..jU+U−1, the ring over ranks with the same rank % U.
    by_ulysses = [dist.new_group(list(range(j * ulysses, (j + 1) * ulysses))) for j in range(ring)]
    by_ring = [dist.new_group(list(range(u, ulysses * ring, ulysses))) for u in range(ulysses)]
    return functools.partial(ulysses_attention, ulysses_group=by_ulysses[rank // ulysses], ring_group=by_ring[rank % ulysses])


def _count_one(rank: int, method: str, ulysses: int, ring: int, model_name: str, seq_len: int) -> int:
    """Bytes this rank sends for attention in one forward+backward of ``method``."""
    world = ulysses * ring
    torch.manual_seed(0)
    model = Transformer(MODELS[model_name], RopeConfig(), VOCAB)
    model.attention_fn = _attention(method, ulysses, ring, rank)
    tokens = torch.randint(0, VOCAB, (1, seq_len + 1), generator=torch.Generator().manual_seed(1))
    ids, labels = (zigzag_shard(x, rank, world) for x in (tokens[:, :-1], tokens[:, 1:]))
    sent = []
    real_isend, real_all_to_all = dist.isend, dist.all_to_all

    def isend(tensor, *args, **kwargs):
        sent.append(tensor.nbytes)
        return real_isend(tensor, *args, **kwargs)

    def all_to_all(outputs, inputs, group=None, **kwargs):
        own = dist.get_rank(group)
        sent.append(sum(x.nbytes for i, x in enumerate(inputs) if i != own))
        return real_all_to_all(outputs, inputs, group=group, **kwargs)

    with mock.patch.object(dist, "isend", isend), mock.patch.object(dist, "all_to_all", all_to_all):
        model(ids, zigzag_positions(seq_len, rank, world)[None], labels).objective.backward()
    return sum(sent)


def _counted(rank: int, world: int, seq_len: int, init_file: str, results: mp.SimpleQueue) -> None:
    """Every (model, method) in turn on the first U·R of ``world`` ranks (the others only
    join the group creation): one spawn for the whole table."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    for model_name in MODELS:
        for method, ulysses, ring in METHODS:
            if rank < ulysses * ring:
                results.put((model_name, method, ulysses, ring, rank,
                             _count_one(rank, method, ulysses, ring, model_name, seq_len)))
            else:
                _attention(method, ulysses, ring, rank)  # the collective group creation only
    dist.destroy_process_group()


def counted_bytes(seq_len: int) -> dict[tuple[str, str, int, int], list[int]]:
    """{(model, method, U, R): bytes each rank sent for attention in one forward+backward,
    rank order}."""
    world = max(u * r for _, u, r in METHODS)
    results: mp.SimpleQueue = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_counted, args=(world, seq_len, f"{tmp}/rendezvous", results), nprocs=world,
                           start_method="spawn")
    counted: dict[tuple[str, str, int, int], list[tuple[int, int]]] = {}
    while not results.empty():
        model_name, method, u, r, rank, n = results.get()
        counted.setdefault((model_name, method, u, r), []).append((rank, n))
    return {key: [n for _, n in sorted(per_rank)] for key, per_rank in counted.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    print(f"attention bytes sent per rank, one forward+backward, {args.seq} tokens, fp32, 2 layers")
    print("| model | method | U×R | counted per rank | planner | equal |")
    print("|---|---|---|---|---|---|")
    table = counted_bytes(args.seq)
    for model_name, model in MODELS.items():
        for method, u, r in METHODS:
            counted = table[model_name, method, u, r]
            predicted = predicted_bytes(model, args.seq, u, r)
            equal = all(n == predicted for n in counted)
            print(f"| {model_name} | {method} | {u}×{r} | {', '.join(f'{n:,}' for n in sorted(set(counted)))} "
                  f"| {predicted:,} | {'yes' if equal else 'NO'} |")


if __name__ == "__main__":
    main()
