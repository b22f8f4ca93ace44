"""Time of document-masked vs unmasked causal attention (forward+backward), cp=1 and cp=2.

    python -m bench.document_masking [--seq 8192] [--mean-doc 1024] [--repeats 3]

One sequence of ``--seq`` tokens packs documents of random lengths (exponential with
mean ``--mean-doc``, at least one token). Masked attention cuts every block at document
boundaries (``attention/documents.py``) and skips blocks without a shared document, so
it should cost about mean_doc / seq of the unmasked time plus per-call overhead. Both
variants run side by side in the same processes, alternating, and the medians are
compared (for cp=2: the slowest rank of each repeat). One thread per rank.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longtrain.attention.documents import document_attention
from longtrain.attention.kernels import attention
from longtrain.attention.ring import ring_attention
from longtrain.parallel.sharding import zigzag_shard

HEADS, KV_HEADS, HEAD_DIM = 8, 2, 64


def packed_doc_ids(seq: int, mean_doc: int, seed: int = 0) -> torch.Tensor:
    """[1, seq] doc ids of documents with exponential lengths (mean ``mean_doc``)."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, rng.exponential(mean_doc, size=4 * seq // mean_doc + 8).astype(np.int64))
    ends = np.cumsum(lengths)
    doc_ids = np.searchsorted(ends, np.arange(seq), side="right")
    return torch.from_numpy(doc_ids)[None]


def _run(rank: int, cp: int, seq: int, mean_doc: int, repeats: int, init_file: str, results: mp.SimpleQueue) -> None:
    torch.set_num_threads(1)
    group = None
    if cp > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=cp)
        group = dist.group.WORLD
    gen = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(1, HEADS, seq, HEAD_DIM, generator=gen) for _ in range(2))
    k, v = (torch.randn(1, KV_HEADS, seq, HEAD_DIM, generator=gen) for _ in range(2))
    doc_ids = packed_doc_ids(seq, mean_doc)
    if cp > 1:
        q, k, v, dout = (zigzag_shard(x, rank, cp, dim=2).clone() for x in (q, k, v, dout))
        doc_ids = zigzag_shard(doc_ids, rank, cp, dim=1)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    scale = HEAD_DIM**-0.5

    def step(masked: bool) -> float:
        if group is not None:
            dist.barrier(group)
        start = time.perf_counter()
        docs = doc_ids if masked else None
        if cp > 1:
            out = ring_attention(q, k, v, scale, group, doc_ids=docs)
        else:
            out = (document_attention(q, k, v, docs, scale) if masked else attention(q, k, v, True, scale))[0]
        out.backward(dout)
        q.grad = k.grad = v.grad = None
        return time.perf_counter() - start

    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(repeats + 1):  # the first round warms up
        for masked in (False, True):
            t = step(masked)
            if r:
                times[masked].append(t)
    results.put(times)
    if group is not None:
        dist.destroy_process_group()


def measure(cp: int, seq: int, mean_doc: int, repeats: int) -> tuple[float, float]:
    """(unmasked median s, masked median s)."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("spawn")
        results = ctx.SimpleQueue()
        procs = [
            ctx.Process(target=_run, args=(r, cp, seq, mean_doc, repeats, f"{tmp}/rdv", results)) for r in range(cp)
        ]
        for p in procs:
            p.start()
        per_rank = [results.get() for _ in procs]
        for p in procs:
            p.join()
    slowest = {m: [max(t[m][i] for t in per_rank) for i in range(repeats)] for m in (False, True)}
    return statistics.median(slowest[False]), statistics.median(slowest[True])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--mean-doc", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    docs = int(packed_doc_ids(args.seq, args.mean_doc).max()) + 1
    print(f"seq {args.seq}, {docs} documents (mean length {args.mean_doc}), heads {HEADS}/{KV_HEADS}, head_dim {HEAD_DIM}")
    print("| cp | unmasked s | masked s | masked / unmasked |")
    print("|---|---|---|---|")
    for cp in (1, 2):
        dense, masked = measure(cp, args.seq, args.mean_doc, args.repeats)
        print(f"| {cp} | {dense:.3f} | {masked:.3f} | {masked / dense:.3f} |", flush=True)


if __name__ == "__main__":
    main()
