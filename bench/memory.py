"""Memory at long context: the longest sequence whose training step fits a memory cap, and
peak memory vs sequence length with activation checkpointing.

The bench model and step of ``bench/throughput.py`` (one AdamW step, fp32, CPU), each
length in a fresh process, peak RSS from the kernel's high-water mark.

    # (b) longest sequence under a cap, bisecting over lengths (multiples of --granule)
    python -m bench.memory longest --cap-gb 1.0 --impls hf none selective full_tiled --vocab 32000
    # (c) peak memory vs length with full checkpointing, and the fitted log-log exponent
    python -m bench.memory scaling --impls full_tiled --seq-lens 8192 16384 32768 65536 131072

``--doc-len N`` packs the longtrain sequence into N-token documents (document masking):
attention then costs O(T·N) instead of O(T²), which is what makes 128K-token steps
affordable on 2 CPU cores, while the step holds the same tensors (the kernel runs once
per document instead of once per sequence). The scaling table states which was used; run
it once with and once without at the shorter lengths to see the two agree.

Every process runs with glibc's mmap threshold fixed at 1 MiB (``--mmap-threshold``; see
``throughput.measure``), so RSS follows the memory the step holds.
"""

from __future__ import annotations

import argparse
import math

from bench.throughput import BYTE_VOCAB, IMPLS, LONGTRAIN_IMPLS, Result, measure


def _fits(result: Result, cap_gb: float) -> bool:
    """The step's own memory (peak RSS above the pre-step high-water: activations,
    gradients, optimizer state, workspace) within the cap. Not the process's whole RSS,
    which also counts imports (transformers' alone is ~0.14 GB more than longtrain's)."""
    return result.seconds is not None and result.peak_gb - result.static_gb <= cap_gb


def longest(impl: str, cap_gb: float, granule: int, limit: int, **kw) -> tuple[int, dict[int, Result]]:
    """The longest multiple of ``granule`` (up to ``limit``) whose step needs at most
    ``cap_gb`` (``_fits``): doubling until a length does not fit, then bisecting."""
    probes: dict[int, Result] = {}

    def fits(n: int) -> bool:
        # The address-space cap only stops a runaway probe; fitting is judged on peak RSS.
        probes[n] = measure(impl, n * granule, 0, max_gb=4 + 4 * cap_gb, **kw)
        r = probes[n]
        print(f"  {impl:>10} {n * granule:>7} tokens: step {r.peak_gb - r.static_gb:.2f} GB (peak {r.peak_gb:.2f}) "
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
    ap.add_argument("--cap-gb", type=float, default=1.0, help="longest: the memory a step may take (see _fits)")
    ap.add_argument("--granule", type=int, default=1024, help="longest: lengths tried are multiples of this")
    ap.add_argument("--limit", type=int, default=262144, help="longest: the longest length tried")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    ap.add_argument("--vocab", type=int, default=BYTE_VOCAB)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mlp-tile", type=int, default=2048, help="model.mlp_tile_tokens of full_tiled")
    ap.add_argument("--doc-len", type=int, default=0, help="longtrain: document length (0: one causal sequence)")
    ap.add_argument("--mmap-threshold", type=int, default=1 << 20, help="glibc mmap threshold, bytes (see throughput.measure)")
    args = ap.parse_args()
    kw = dict(threads=args.threads, vocab=args.vocab, mlp_tile=args.mlp_tile, mmap_threshold=args.mmap_threshold)
    docs = f"{args.doc_len}-token documents" if args.doc_len else "one causal sequence"
    print(f"vocab {args.vocab}, longtrain on {docs}, mmap threshold {args.mmap_threshold}", flush=True)
    if args.part == "longest":
        found = {}
        for impl in args.impls:
            doc_len = args.doc_len if impl in LONGTRAIN_IMPLS else 0
            found[impl], _ = longest(impl, args.cap_gb, args.granule, args.limit, doc_len=doc_len, **kw)
        hf = found.get("hf")
        print(f"longest trainable sequence whose step takes at most {args.cap_gb} GB:")
        for impl, n in found.items():
            print(f"  {impl:>10} {n:>7} tokens" + (f"  {n / hf:.1f}x HF" if hf else ""))
        return
    print(f"{'impl':>10} {'seq':>7} {'wall s':>8} {'cpu s':>8} {'peak GB':>8} {'static GB':>9} {'above static GB':>15}",
          flush=True)
    for impl in args.impls:
        doc_len = args.doc_len if impl in LONGTRAIN_IMPLS else 0
        rows = []
        for n in args.seq_lens:
            r = measure(impl, n, 0, doc_len=doc_len, **kw)
            rows.append((n, r))
            print(f"{impl:>10} {n:>7} {r.seconds:>8.1f} {r.cpu_seconds:>8.1f} {r.peak_gb:>8.2f} {r.static_gb:>9.2f} "
                  f"{r.peak_gb - r.static_gb:>15.2f}", flush=True)
        if len(rows) > 1:
            lens = [n for n, _ in rows]
            above = [r.peak_gb - r.static_gb for _, r in rows]
            # A step too short to raise RSS above static at some length has no exponent to fit.
            above_slope = f"{loglog_slope(lens, above):.3f}" if min(above) > 0 else "n/a (no growth above static measured)"
            print(f"{impl:>10} fitted exponent (log-log slope) of peak RSS: "
                  f"{loglog_slope(lens, [r.peak_gb for _, r in rows]):.3f}; of peak above static: {above_slope}", flush=True)


if __name__ == "__main__":
    main()
