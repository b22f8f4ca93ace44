"""Peak memory of the gate's evaluation on one rank: full [T, vocab] logits (the evaluator
before issue 27) against per-token scores (``score_fn``: labelled rows projected one loss
chunk at a time).

Each (mode, task) runs in a fresh process: the bench model of ``bench/throughput.py`` with
``--vocab`` outputs, one evaluation forward of ``--seq-len`` tokens, and the step's memory
as the rise of the kernel's RSS high-water mark over the model's. Two tasks: loss by
position (every token labelled: the most scoring work) and the needle (one answer token).
Attention is ``bench.throughput``'s elementwise stub by default, so the minutes go to what
differs (the vocabulary side), not to O(T²) attention on a CPU; its memory is the same.

    python -m bench.eval_memory --seq-len 32768 --vocab 32000
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue as queue_module
from typing import Optional

import torch
import torch.nn.functional as F

from bench.proc_status import status_kib
from bench.throughput import _stub_attention

MODES = ("logits", "scores")
TASKS = ("position_loss", "needle")


def _labels(task: str, seq_len: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, vocab, (1, seq_len), generator=g)
    if task == "needle":  # one answer token near the end, the rest ignored
        labels[:, :-3] = -100
        labels[:, -2:] = -100
    return labels


def _evaluate_with_logits(model, ids, pos, labels) -> None:
    """The evaluation before: full logits in fp32, then cross-entropy and argmax over them
    (at cp=1 the evaluator's all-gather and un-shard were skipped: the least it held)."""
    logits = model(ids, pos).float()
    F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    logits.argmax(dim=-1)


def _run(mode: str, task: str, seq_len: int, vocab: int, chunk: int, threads: int, queue) -> None:
    from longtrain.config import ModelConfig, RopeConfig
    from longtrain.model.load import scorer
    from longtrain.model.transformer import Transformer

    torch.set_num_threads(threads)
    model = Transformer(ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=2), RopeConfig(), vocab_size=vocab).eval()
    model.attention_fn = lambda q, k, v, scale, doc_ids=None: _stub_attention(q, k, v)
    ids = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(1))
    pos, labels = torch.arange(seq_len)[None], _labels(task, seq_len, vocab)
    before = status_kib("VmHWM")
    with torch.no_grad():
        if mode == "logits":
            _evaluate_with_logits(model, ids, pos, labels)
        else:
            scorer(model, chunk)(ids, pos, labels)
    queue.put((before / 2**20, status_kib("VmHWM") / 2**20))


def measure(mode: str, task: str, seq_len: int, vocab: int, chunk: int, threads: int) -> Optional[tuple[float, float]]:
    """(model's peak RSS, the evaluation's peak RSS) in GiB, from a fresh process; None if
    it died (killed for memory)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_run, args=(mode, task, seq_len, vocab, chunk, threads, queue))
    p.start()
    while p.is_alive() or not queue.empty():
        try:
            return queue.get(timeout=1)
        except queue_module.Empty:
            continue
    print(f"  {task} {mode}: the process died (exit code {p.exitcode})", flush=True)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=32768)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--loss-chunk", type=int, default=256, help="optim.loss_chunk_size (the default config's)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    print(f"{args.seq_len} tokens, vocab {args.vocab}, one rank; GiB of peak RSS")
    print(f"{'task':<14} {'mode':<7} {'model':>7} {'peak':>7} {'evaluation':>11}")
    for task in TASKS:
        for mode in MODES:
            result = measure(mode, task, args.seq_len, args.vocab, args.loss_chunk, args.threads)
            if result is None:
                continue
            static, peak = result
            print(f"{task:<14} {mode:<7} {static:7.2f} {peak:7.2f} {peak - static:11.2f}", flush=True)


if __name__ == "__main__":
    main()
