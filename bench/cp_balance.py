"""How evenly context parallelism spreads document-masked attention over the cp ranks.

Windows of packed documents from the Python standard library (the stdlib_code source;
a document's length is its byte-tokenizer token count: its UTF-8 bytes and a BOS), cut at
random offsets. For each window, each rank's attention work is read off the layout the
trainer builds (``DocumentLayout``: the (query, key) pairs of every ring step's
rectangles), for zigzag by position and for per-document zigzag
(``parallel.cp_load_balancer``). Printed: the busiest rank's work over the mean, median,
p90 and worst over the windows.

    python -m bench.cp_balance [--windows 200]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from longtrain.attention.layout import DocumentLayout
from longtrain.data.sources import stdlib_files
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


def balance_table(windows: int) -> dict[tuple[int, int, str], np.ndarray]:
    """{(seq_len, cp, balancer): max/mean per window}."""
    lengths = stdlib_document_lengths()
    table = {}
    for seq_len in LENGTHS:
        docs = window_doc_ids(lengths, seq_len, windows)
        for cp in CPS:
            for balancer in ("zigzag", "documents"):
                table[seq_len, cp, balancer] = np.array([busiest_over_mean(d, cp, balancer) for d in docs])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=200)
    args = parser.parse_args()
    lengths = stdlib_document_lengths()
    print(f"{len(lengths)} documents, median {np.median(lengths):.0f} tokens, mean {lengths.mean():.0f}; "
          f"{args.windows} windows per length")
    print("| length | cp | zigzag median / p90 / worst | per-document median / p90 / worst |")
    print("|---|---|---|---|")
    table = balance_table(args.windows)
    for seq_len in LENGTHS:
        for cp in CPS:
            cells = [
                " / ".join(f"{v:.3f}" for v in (np.median(r), np.percentile(r, 90), r.max()))
                for r in (table[seq_len, cp, "zigzag"], table[seq_len, cp, "documents"])
            ]
            print(f"| {seq_len // 1024}K | {cp} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
