"""Peak memory and time of attention forward+backward: ring cp=2 per rank vs one rank.

    python -m bench.ring_memory [--seq 16384] [--repeats 3]     # from the repo root

Each configuration runs in fresh spawned processes (CPU, gloo). Memory is the RSS
high-water mark (``ru_maxrss``) of one fwd+bwd over a baseline taken after imports,
input allocation and a tiny warm-up call (thread pools, autograd engine, gloo buffers);
tracemalloc would not see torch's allocator. glibc's mmap threshold is pinned at 64 KiB
so freed tensors go back to the OS: otherwise its dynamic threshold keeps them in the
heap and the high-water mark follows allocation history rather than live memory.
Timings are medians over the later repeats (for the ring, the slowest rank of each
repeat). The machine's cores are split evenly between the ranks.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longtrain.attention.kernels import attention
from longtrain.attention.ring import ring_attention
from longtrain.parallel.sharding import zigzag_shard

HEADS, KV_HEADS, HEAD_DIM, BATCH = 8, 2, 32, 1


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _run(rank: int, cp: int, seq: int, repeats: int, init_file: str, results: mp.SimpleQueue) -> None:
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // cp))
    group = None
    if cp > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=cp)
        group = dist.group.WORLD
    gen = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(BATCH, HEADS, seq, HEAD_DIM, generator=gen) for _ in range(2))
    k, v = (torch.randn(BATCH, KV_HEADS, seq, HEAD_DIM, generator=gen) for _ in range(2))
    if cp > 1:  # each rank keeps only its zigzag shard, as in training
        q, k, v, dout = (zigzag_shard(x, rank, cp, dim=2).clone() for x in (q, k, v, dout))
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor) -> float:
        if group is not None:
            dist.barrier(group)
        start = time.perf_counter()
        out = ring_attention(q, k, v, HEAD_DIM**-0.5, group) if cp > 1 else attention(q, k, v)[0]
        out.backward(dout)
        q.grad = k.grad = v.grad = None
        return time.perf_counter() - start

    # A tiny call first starts thread pools, the autograd engine and gloo's buffers, so
    # the measured delta is the attention's own memory, not one-off runtime setup.
    step(*(x[:, :, : 2 * cp].detach().clone().requires_grad_() for x in (q, k, v)), dout[:, :, : 2 * cp])
    baseline = _max_rss_mib()
    step(q, k, v, dout)
    peak = _max_rss_mib() - baseline
    times = torch.tensor([step(q, k, v, dout) for _ in range(repeats)], dtype=torch.float64)
    if group is not None:
        dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)  # a ring step is as slow as its slowest rank
        dist.destroy_process_group()
    results.put((rank, peak, statistics.median(times.tolist())))


def measure(cp: int, seq: int, repeats: int) -> tuple[list[float], float]:
    """(peak MiB per rank, median seconds per fwd+bwd) of one configuration."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _run, args=(cp, seq, repeats, os.path.join(tmp, "rendezvous"), results), nprocs=cp, start_method="spawn"
        )
    rows = sorted(results.get() for _ in range(cp))
    return [peak for _, peak, _ in rows], rows[0][2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))  # read by glibc in the spawned ranks
    print(
        f"causal attention fwd+bwd, seq {args.seq}, batch {BATCH}, {HEADS} q heads / {KV_HEADS} kv heads, "
        f"head_dim {HEAD_DIM}, fp32, CPU ({len(os.sched_getaffinity(0))} cores shared by the ranks)"
    )
    single_peak, single_time = measure(1, args.seq, args.repeats)
    ring_peaks, ring_time = measure(2, args.seq, args.repeats)
    ratio = max(ring_peaks) / single_peak[0]
    print(f"{'':24}{'peak MiB / rank':>18}{'median s':>12}")
    print(f"{'single rank (cp=1)':24}{single_peak[0]:>18.1f}{single_time:>12.3f}")
    print(f"{'ring cp=2 (max rank)':24}{max(ring_peaks):>18.1f}{ring_time:>12.3f}")
    print(f"per-rank peaks, ring: {', '.join(f'{p:.1f}' for p in ring_peaks)} MiB")
    print(f"memory ratio ring/single: {ratio:.3f} (goal <= 0.6); time ratio: {ring_time / single_time:.3f}")


if __name__ == "__main__":
    main()
