"""Training throughput and peak memory of a small model vs Hugging Face Qwen3, side by side.

Same architecture and size on both sides (2.89M params: d=256, 4 layers, 8 q / 2 kv heads,
byte vocab, tied embeddings; the `tiny` model before it became the 2-layer demo model),
one AdamW step on one batch of `--seq-lens` tokens, fp32 on the CPU. Each configuration
runs in a fresh process so peak RSS is its own. Prints medians and the ratio ours / HF.

    python -m bench.throughput --seq-lens 2048 8192 --steps 5
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time

import torch


def _build(impl: str):
    from longtrain.config import ModelConfig, RopeConfig
    from longtrain.model.transformer import Transformer

    cfg = ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=2)
    if impl == "longtrain":
        model = Transformer(cfg, RopeConfig(), vocab_size=259)

        def loss_fn(ids, pos):
            sums = model(ids, pos, ids, 1024)
            return (sums.ce + 1e-4 * sums.z) / sums.tokens

        return model, loss_fn
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hf = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=259, hidden_size=256, intermediate_size=cfg.resolved_ffn_dim(), num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
            attn_implementation="sdpa",
        )
    )
    return hf, lambda ids, pos: hf(input_ids=ids, position_ids=pos, labels=ids).loss


def _run(impl: str, seq_len: int, steps: int, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, loss_fn = _build(impl)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (1, seq_len))
    pos = torch.arange(seq_len)[None]
    times = []
    for i in range(steps + 1):  # the first step warms up allocators and kernels
        t0 = time.perf_counter()
        loss_fn(ids, pos).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    queue.put((statistics.median(times), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2))


def measure(impl: str, seq_len: int, steps: int, threads: int) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_run, args=(impl, seq_len, steps, threads, queue))
    p.start()
    result = queue.get()
    p.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(f"{'seq':>6} {'impl':>10} {'median s/step':>14} {'tok/s':>8} {'peak RSS GB':>12}")
    for seq_len in args.seq_lens:
        rows = {impl: measure(impl, seq_len, args.steps, args.threads) for impl in ("hf_qwen3", "longtrain")}
        for impl, (t, rss) in rows.items():
            print(f"{seq_len:>6} {impl:>10} {t:>14.3f} {seq_len / t:>8.0f} {rss:>12.2f}")
        (t_hf, rss_hf), (t_lt, rss_lt) = rows["hf_qwen3"], rows["longtrain"]
        print(f"{seq_len:>6} {'ratio':>10}  throughput longtrain/HF = {t_hf / t_lt:.2f}x, peak RSS = {rss_lt / rss_hf:.2f}x")


if __name__ == "__main__":
    main()
