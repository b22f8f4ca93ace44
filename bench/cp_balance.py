"""How evenly context parallelism spreads document-masked attention over the cp ranks.

Windows of packed documents from the Python standard library (the stdlib_code source;
a document's length is its byte-tokenizer token count: its UTF-8 bytes and a BOS), cut at
random offsets. For each window, each rank's attention work is read off the layout the
trainer builds (``DocumentLayout``: the (query, key) pairs of every ring step's
rectangles), for zigzag by position and for per-document zigzag
(``parallel.cp_load_balancer``). Printed: the busiest rank's work over the mean, median,
p90 and worst over the windows.

With ``--step``: the time of a document-masked forward+backward of a one-layer model at
cp = 2 on two gloo ranks (one thread each), both balancers on the same windows side by
side, alternating; a step's time is its slower rank's, and the ratio of medians is printed.

    python -m bench.cp_balance [--windows 200] [--lengths 32768 131072] [--step] [--step-windows 3]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longtrain.attention.layout import DocumentLayout, shard_with_layout, use_layout
from longtrain.attention.ring import ring_attention
from longtrain.config import ModelConfig, RopeConfig
from longtrain.data.sources import stdlib_files
from longtrain.model.transformer import Transformer
from longtrain.parallel.sharding import document_zigzag_index

LENGTHS, CPS = (32768, 131072), (2, 4, 8)


def stdlib_document_lengths() -> np.ndarray:
    """Token counts of the stdlib's .py files under the byte tokenizer (bytes + BOS)."""
    return np.array([path.stat().st_size + 1 for path in stdlib_files()[1]], dtype=np.int64)


def window_doc_ids(lengths: np.ndarray, seq_len: int, windows: int, seed: int = 0) -> list[torch.Tensor]:
    """Doc ids [1, seq_len] of ``windows`` windows of the packed stream (documents in a
    seeded shuffled order), numbered from 0 within each window as the packer does."""
    rng = np.random.default_rng(seed)
    starts = np.concatenate([[0], np.cumsum(lengths[rng.permutation(len(lengths))])])
    offsets = rng.integers(0, starts[-1] - seq_len, size=windows)
    result = []
    for offset in offsets:
        doc = np.searchsorted(starts, np.arange(offset, offset + seq_len), side="right")
        result.append(torch.from_numpy(doc - doc[0])[None])
    return result


def busiest_over_mean(doc_ids: torch.Tensor, cp: int, balancer: str) -> float:
    """Max over mean of the cp ranks' attention work for one window."""
    if balancer == "documents":
        index = document_zigzag_index(doc_ids, cp)
        work = [DocumentLayout.by_documents(doc_ids, index, r).work() for r in range(cp)]
    else:
        work = [DocumentLayout.zigzag(doc_ids, r, cp).work() for r in range(cp)]
    return max(work) / (sum(work) / cp)


def balance_table(seq_lens: list[int], windows: int) -> dict[tuple[int, int, str], np.ndarray]:
    """{(seq_len, cp, balancer): max/mean per window}."""
    lengths = stdlib_document_lengths()
    table = {}
    for seq_len in seq_lens:
        docs = window_doc_ids(lengths, seq_len, windows)
        for cp in CPS:
            for balancer in ("zigzag", "documents"):
                table[seq_len, cp, balancer] = np.array([busiest_over_mean(d, cp, balancer) for d in docs])
    return table


# Attention-heavy: one layer, few channels, so the step time is mostly attention.
STEP_MODEL = ModelConfig(dim=64, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=32)
BALANCERS = ("zigzag", "documents")


def _step_worker(rank: int, seq_lens: list[int], windows: int, init_file: str, results: mp.SimpleQueue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same weights on both ranks
    model = Transformer(STEP_MODEL, RopeConfig(), vocab_size=256)
    model.attention_fn = functools.partial(ring_attention, group=dist.group.WORLD)
    lengths = stdlib_document_lengths()
    for seq_len in seq_lens:
        for w, doc_ids in enumerate(window_doc_ids(lengths, seq_len, windows)):
            tokens = torch.randint(0, 256, (1, seq_len + 1), generator=torch.Generator().manual_seed(w))
            batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "position_ids": torch.arange(seq_len)[None],
                     "doc_ids": doc_ids}
            for balancer in BALANCERS:
                local, layout = shard_with_layout(batch, rank, 2, balancer)
                dist.barrier()
                start = time.perf_counter()
                with use_layout(local["doc_ids"], layout):
                    sums = model(local["input_ids"], local["position_ids"], local["labels"], doc_ids=local["doc_ids"])
                    sums.objective.backward()
                seconds = torch.tensor(time.perf_counter() - start)
                dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
                if rank == 0:
                    results.put((seq_len, balancer, float(seconds)))
    dist.destroy_process_group()


def step_times(seq_lens: list[int], windows: int) -> dict[tuple[int, str], list[float]]:
    """{(seq_len, balancer): forward+backward seconds per window} at cp = 2."""
    results: mp.SimpleQueue = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_step_worker, args=(seq_lens, windows, f"{tmp}/rendezvous", results), nprocs=2,
                           start_method="spawn")
    times: dict[tuple[int, str], list[float]] = {}
    while not results.empty():
        seq_len, balancer, seconds = results.get()
        times.setdefault((seq_len, balancer), []).append(seconds)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=200)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--step", action="store_true", help="also time a masked step at cp=2 with both balancers")
    parser.add_argument("--step-windows", type=int, default=3)
    args = parser.parse_args()
    lengths = stdlib_document_lengths()
    print(f"{len(lengths)} documents, median {np.median(lengths):.0f} tokens, mean {lengths.mean():.0f}; "
          f"{args.windows} windows per length")
    print("| length | cp | zigzag median / p90 / worst | per-document median / p90 / worst |")
    print("|---|---|---|---|")
    table = balance_table(args.lengths, args.windows)
    for seq_len in args.lengths:
        for cp in CPS:
            cells = [
                " / ".join(f"{v:.3f}" for v in (np.median(r), np.percentile(r, 90), r.max()))
                for r in (table[seq_len, cp, "zigzag"], table[seq_len, cp, "documents"])
            ]
            print(f"| {seq_len // 1024}K | {cp} | {cells[0]} | {cells[1]} |")
    if args.step:
        times = step_times(args.lengths, args.step_windows)
        print(f"\nforward+backward at cp=2, {args.step_windows} windows, seconds (slower rank):")
        print("| length | zigzag (median) | per-document (median) | zigzag / per-document |")
        print("|---|---|---|---|")
        for seq_len in args.lengths:
            zigzag, documents = (statistics.median(times[seq_len, b]) for b in BALANCERS)
            print(f"| {seq_len // 1024}K | {zigzag:.2f} | {documents:.2f} | {zigzag / documents:.2f} |")


if __name__ == "__main__":
    main()
