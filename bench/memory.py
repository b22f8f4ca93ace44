"""Memory at long context: the longest sequence whose training step fits a memory cap, and
peak memory vs sequence length with activation checkpointing.

The bench model and step of ``bench/throughput.py`` (one AdamW step, fp32, CPU), each
length in a fresh process, peak RSS from the kernel's high-water mark.

    # (b) longest sequence under a cap, bisecting over lengths (multiples of --granule)
    python -m bench.memory longest --cap-gb 1.5 --impls hf none full selective --vocab 32000
    # (c) peak memory vs length with full checkpointing, and the fitted log-log exponent
    python -m bench.memory scaling --impl full --seq-lens 8192 16384 32768 65536 131072

``--doc-len N`` packs the longtrain sequence into N-token documents (document masking):
attention then costs O(T·N) instead of O(T²), which is what makes 128K-token steps
affordable on 2 CPU cores, while the step holds the same tensors (the kernel runs once
per document instead of once per sequence). The scaling table states which was used; run
it once with and once without at the shorter lengths to see the two agree.
"""

from __future__ import annotations

import argparse
import math

from bench.throughput import BYTE_VOCAB, IMPLS, LONGTRAIN_IMPLS, Result, measure


def _fits(result: Result, cap_gb: float) -> bool:
    return result.seconds is not None and result.peak_gb <= cap_gb


def longest(impl: str, cap_gb: float, granule: int, vocab: int, threads: int, mlp_tile: int, doc_len: int,
            limit: int) -> tuple[int, dict[int, Result]]:
    """The longest multiple of ``granule`` (up to ``limit``) whose step peaks at or under
    ``cap_gb``: doubling until a length does not fit, then bisecting."""
    probes: dict[int, Result] = {}

    def fits(n: int) -> bool:
        # The address-space cap only stops a runaway probe; fitting is judged on peak RSS.
        probes[n] = measure(impl, n * granule, 0, threads, vocab, mlp_tile, doc_len, max_gb=4 * cap_gb)
        print(f"  {impl:>10} {n * granule:>7} tokens: peak {probes[n].peak_gb:.2f} GB "
              f"{'fits' if _fits(probes[n], cap_gb) else 'over'}", flush=True)
        return _fits(probes[n], cap_gb)

    lo, hi = 0, 1  # lo fits (0: none known), hi is the next candidate
    while hi * granule <= limit and fits(hi):
        lo, hi = hi, 2 * hi
    hi = min(hi, limit // granule + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * granule, probes


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["longest", "scaling"])
    ap.add_argument("--impls", nargs="+", choices=IMPLS, default=["hf", "none", "full", "selective"])
    ap.add_argument("--impl", choices=LONGTRAIN_IMPLS, default="full", help="scaling: the longtrain mode")
    ap.add_argument("--cap-gb", type=float, default=1.5)
    ap.add_argument("--granule", type=int, default=1024)
    ap.add_argument("--limit", type=int, default=262144, help="longest: the longest length tried")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    ap.add_argument("--vocab", type=int, default=BYTE_VOCAB)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mlp-tile", type=int, default=2048)
    ap.add_argument("--doc-len", type=int, default=0, help="longtrain: document length (0: one causal sequence)")
    args = ap.parse_args()
    if args.part == "longest":
        found = {}
        for impl in args.impls:
            doc_len = args.doc_len if impl in LONGTRAIN_IMPLS else 0
            found[impl], _ = longest(impl, args.cap_gb, args.granule, args.vocab, args.threads, args.mlp_tile,
                                     doc_len, args.limit)
        hf = found.get("hf")
        print(f"longest trainable sequence under {args.cap_gb} GB peak RSS (vocab {args.vocab}):")
        for impl, n in found.items():
            print(f"  {impl:>10} {n:>7} tokens" + (f"  {n / hf:.1f}x HF" if hf else ""))
        return
    rows = [(n, measure(args.impl, n, 0, args.threads, args.vocab, args.mlp_tile, args.doc_len)) for n in args.seq_lens]
    print(f"{args.impl} (doc_len {args.doc_len or 'none'}, vocab {args.vocab}):")
    print(f"{'seq':>7} {'s/step':>8} {'peak GB':>8} {'static GB':>9} {'above static GB':>15}")
    for n, r in rows:
        print(f"{n:>7} {r.seconds:>8.1f} {r.peak_gb:>8.2f} {r.static_gb:>9.2f} {r.peak_gb - r.static_gb:>15.2f}")
    lens = [n for n, _ in rows]
    print(f"fitted exponent (log-log slope) of peak RSS: {loglog_slope(lens, [r.peak_gb for _, r in rows]):.3f}; "
          f"of peak above static: {loglog_slope(lens, [r.peak_gb - r.static_gb for _, r in rows]):.3f}")


if __name__ == "__main__":
    main()
