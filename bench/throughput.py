"""Training throughput and peak memory of a small model vs Hugging Face Qwen3, side by side.

Same architecture and size on both sides (2.89M params with the byte vocab: d=256, 4
layers, 8 q / 2 kv heads, tied embeddings; the `tiny` model before it became the 2-layer
demo model), one AdamW step on one batch of `--seq-lens` tokens, fp32 on the CPU, with
the byte vocabulary (259) and/or a 32K one (`--vocabs`).

Speed: all implementations are built in one fresh process and stepped in turn, one step
each per round for ``--steps`` rounds after a warm-up step; a ratio is the median over
rounds of the two step times of that round. This machine's speed drifts by tens of
percent over minutes (a shared host), which separate runs minutes apart would take for a
difference between implementations. Times are the process's CPU time,
which other jobs disturb less than wall time. Peak RSS: each implementation alone in a
fresh process, one step.

    python -m bench.throughput --seq-lens 2048 8192 --vocabs 259 32000 --steps 7 --threads 1

Implementations (`--impls`): hf (Qwen3ForCausalLM, SDPA), hf_gc (the same with HF's
gradient checkpointing), hf_compiled (each decoder layer under torch.compile), and
longtrain with each `model.activation_checkpointing` mode: none, full, selective, and
full_tiled (full + `model.mlp_tile_tokens`), and compiled (none + `model.compile`). The
warm-up step of a compiled implementation compiles; its peak RSS includes the compiler's.

`--attention stub` puts one cheap elementwise function of q, k and v in place of the
attention kernel on every side (HF's through its attention registry), so the times compare
the rest of the step: projections, norms, RoPE, MLP, loss and optimizer (the CPU attention
kernel is the same aten op on both sides, and most of a long step).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch

from longtrain.config import OptimConfig

_MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
BYTE_VOCAB = 259
ATTENTION = ("kernel", "stub")
LONGTRAIN_IMPLS = ("none", "full", "selective", "full_tiled", "compiled")
IMPLS = ("hf", "hf_gc", "hf_compiled", *LONGTRAIN_IMPLS)


@dataclass
class Result:
    seconds: Optional[float]  # median step wall time; None: the step did not fit under --max-gb
    cpu_seconds: Optional[float]  # median step CPU time of the process
    peak_gb: float  # peak RSS of the process
    static_gb: float  # peak RSS before the first step (imports, model, data)


def _stub_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``--attention stub``: q [B, Hq, T, D], k/v [B, Hkv, T, D] -> [B, Hq, T, D] laid out
    [B, T, Hq, D] as the kernels write it, differentiable in all three, elementwise cost."""
    kv = (k + v).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return (q.transpose(1, 2) + kv.transpose(1, 2)).transpose(1, 2)


def _hf_stub_attention(module, query, key, value, attention_mask, **kwargs):
    return _stub_attention(query, key, value).transpose(1, 2).contiguous(), None  # HF's [B, T, H, D]


def _build(impl: str, vocab: int, mlp_tile: int, doc_len: int, loss_chunk: int, attention: str = "kernel"):
    from longtrain.config import ModelConfig, RopeConfig
    from longtrain.model.transformer import Transformer
    from longtrain.parallel.activation_checkpointing import apply_activation_checkpointing
    from longtrain.parallel.parallelize import apply_compile

    cfg = ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=2)
    if impl in LONGTRAIN_IMPLS:
        cfg.activation_checkpointing = "none" if impl == "compiled" else impl.removesuffix("_tiled")
        cfg.mlp_tile_tokens = mlp_tile if impl.endswith("_tiled") else 0
        model = Transformer(cfg, RopeConfig(), vocab_size=vocab)
        if attention == "stub":
            model.attention_fn = lambda q, k, v, scale, doc_ids=None: _stub_attention(q, k, v)
        apply_activation_checkpointing(model.layers, cfg.activation_checkpointing)
        if impl == "compiled":
            apply_compile(model)

        def loss_fn(ids, pos):
            docs = torch.arange(ids.shape[1])[None] // doc_len if doc_len else None
            sums = model(ids, pos, ids, loss_chunk, docs, z_loss=1e-4)
            return sums.objective / sums.tokens

        return model, loss_fn
    from transformers import AttentionInterface, Qwen3Config, Qwen3ForCausalLM

    AttentionInterface.register("stub", _hf_stub_attention)
    hf = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=vocab, hidden_size=256, intermediate_size=cfg.resolved_ffn_dim(), num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
            attn_implementation="sdpa" if attention == "kernel" else "stub",
        )
    )
    if impl == "hf_gc":
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if impl == "hf_compiled":  # per layer, as longtrain's compiled blocks
        for layer in hf.model.layers:
            layer.compile()
    return hf, lambda ids, pos: hf(input_ids=ids, position_ids=pos, labels=ids).loss


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _batch(vocab: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, min(vocab, 256), (1, seq_len)), torch.arange(seq_len)[None]


def _train_step(loss_fn, opt, ids: torch.Tensor, pos: torch.Tensor) -> tuple[float, float]:
    """One AdamW step: (wall seconds, CPU seconds of this process)."""
    t0, c0 = time.perf_counter(), time.process_time()
    loss_fn(ids, pos).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, time.process_time() - c0


def _run(impl: str, vocab: int, seq_len: int, steps: int, threads: int, mlp_tile: int, doc_len: int,
         loss_chunk: int, attention: str, max_gb: float, queue) -> None:
    if max_gb:  # a safety cap for configurations that would take the shared machine's memory
        resource.setrlimit(resource.RLIMIT_AS, (int(max_gb * 1024**3),) * 2)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, loss_fn = _build(impl, vocab, mlp_tile, doc_len, loss_chunk, attention)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids, pos = _batch(vocab, seq_len)
    static = _peak_gb()
    times, cpu_times = [], []
    try:
        for i in range(steps + 1):  # the first step warms up allocators and kernels
            wall, cpu = _train_step(loss_fn, opt, ids, pos)
            times.append(wall)
            cpu_times.append(cpu)
    except (MemoryError, RuntimeError) as e:  # RuntimeError: torch's failed allocation
        if "alloc" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        queue.put(Result(None, None, _peak_gb(), static))
        return
    median = lambda xs: statistics.median(xs[1:] or xs)  # noqa: E731
    queue.put(Result(median(times), median(cpu_times), _peak_gb(), static))


def measure(impl: str, seq_len: int, steps: int = 1, threads: int = 1, vocab: int = BYTE_VOCAB,
            mlp_tile: int = 2048, doc_len: int = 0, max_gb: float = 0.0, mmap_threshold: int = 0,
            loss_chunk: int = OptimConfig.loss_chunk_size, attention: str = "kernel") -> Result:
    """One configuration in a fresh process: median step time over ``steps`` after a warm-up
    (``steps`` = 0: the one step's time) and peak RSS.

    ``mmap_threshold`` > 0 fixes glibc's mmap threshold (bytes) in that process: larger
    blocks are mapped and unmapped, so peak RSS is the memory the step holds, not heap
    fragmentation (by default glibc raises the threshold to up to 32 MB as blocks are
    freed and serves later ones from a heap that does not shrink)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_run, args=(impl, vocab, seq_len, steps, threads, mlp_tile, doc_len, loss_chunk, attention, max_gb, queue))
    saved = os.environ.get(_MMAP_ENV)
    if mmap_threshold:
        os.environ[_MMAP_ENV] = str(mmap_threshold)  # read by glibc at the child's start
    try:
        p.start()
    finally:
        if saved is None:
            os.environ.pop(_MMAP_ENV, None)
        else:
            os.environ[_MMAP_ENV] = saved
    result = queue.get()
    p.join()
    return result


def _interleaved(impls: list[str], vocab: int, seq_len: int, steps: int, threads: int, mlp_tile: int,
                 loss_chunk: int, attention: str, queue) -> None:
    torch.set_num_threads(threads)
    runs = {}
    for impl in impls:
        torch.manual_seed(0)
        model, loss_fn = _build(impl, vocab, mlp_tile, 0, loss_chunk, attention)
        runs[impl] = loss_fn, torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids, pos = _batch(vocab, seq_len)

    def step(impl: str) -> float:
        return _train_step(*runs[impl], ids, pos)[1]

    for impl in impls:  # warm-up: allocators, kernels, the optimizer state
        step(impl)
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for _ in range(steps):  # the same order each round: every step follows another implementation's
        for impl in impls:
            times[impl].append(step(impl))
    queue.put(times)


def interleaved_cpu_seconds(impls: list[str], seq_len: int, steps: int, threads: int = 1, vocab: int = BYTE_VOCAB,
                            mlp_tile: int = 2048, loss_chunk: int = OptimConfig.loss_chunk_size,
                            attention: str = "kernel") -> dict[str, list[float]]:
    """CPU seconds of ``steps`` training steps of every implementation, built side by side in
    one fresh process and stepped in turn (one step each per round), so a change in the
    machine's speed over minutes reaches all of them alike. The order stays the same: with
    alternating orders an implementation would sometimes follow itself, with its weights and
    optimizer state still in cache, and the rounds would split into two groups."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_interleaved, args=(impls, vocab, seq_len, steps, threads, mlp_tile, loss_chunk, attention, queue))
    p.start()
    times = queue.get()
    p.join()
    return times


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--vocabs", type=int, nargs="+", default=[BYTE_VOCAB])
    ap.add_argument("--impls", nargs="+", choices=IMPLS, default=["hf", "none"])
    ap.add_argument("--steps", type=int, default=5, help="timed rounds, one step of every implementation each")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mlp-tile", type=int, default=2048, help="model.mlp_tile_tokens of full_tiled")
    ap.add_argument("--loss-chunk", type=int, default=OptimConfig.loss_chunk_size,
                    help="optim.loss_chunk_size of longtrain (default: the config's)")
    ap.add_argument("--attention", choices=ATTENTION, default="kernel",
                    help="stub: a cheap stand-in for the attention kernel on every side, to time the rest of the step")
    ap.add_argument("--max-gb", type=float, default=0.0, help="address-space cap per memory process (0: none)")
    ap.add_argument("--mmap-threshold", type=int, default=0, help="glibc mmap threshold in bytes (0: glibc's default)")
    args = ap.parse_args()
    print(f"{'vocab':>6} {'seq':>6} {'impl':>10} {'cpu s':>7} {'tok/cpu-s':>9} {'peak GB':>8} "
          f"{'speed vs hf':>11} {'RSS vs hf':>9} {'speed vs none':>13} {'RSS vs none':>11}", flush=True)
    for vocab in args.vocabs:
        for seq_len in args.seq_lens:
            # Peak RSS: each implementation alone in a fresh process, one step.
            peak = {impl: measure(impl, seq_len, 0, args.threads, vocab, args.mlp_tile, max_gb=args.max_gb,
                                  mmap_threshold=args.mmap_threshold, loss_chunk=args.loss_chunk,
                                  attention=args.attention).peak_gb
                    for impl in args.impls}
            times = interleaved_cpu_seconds(args.impls, seq_len, args.steps, args.threads, vocab, args.mlp_tile,
                                            args.loss_chunk, args.attention)

            def speed(impl: str, base: str) -> Optional[float]:
                """Median over rounds of base's step time / impl's, each pair from one round."""
                if base not in times:
                    return None
                return statistics.median(b / a for a, b in zip(times[impl], times[base]))

            for impl in args.impls:
                cpu = statistics.median(times[impl])
                print(
                    f"{vocab:>6} {seq_len:>6} {impl:>10} {cpu:>7.2f} {seq_len / cpu:>9.0f} {peak[impl]:>8.2f} "
                    f"{_ratio(speed(impl, 'hf'), 1):>11} {_ratio(peak[impl], peak.get('hf')):>9} "
                    f"{_ratio(speed(impl, 'none'), 1):>13} {_ratio(peak[impl], peak.get('none')):>11}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
