"""Does the model form an induction (match-and-copy) circuit, tied vs untied embeddings?

Needle retrieval is match-and-copy: find where the question's words occurred before and
copy what followed. This bench isolates that skill on random printable strings: each
sequence holds short random segments and, at varying distances, exact copies of earlier
ones. Only tokens inside a copy (after its first) are labelled, so the loss falls below
the alphabet's entropy (ln 95 ≈ 4.55 nats) only once the model copies by content. The
same model is trained with tied and with untied embeddings, side by side, from the
same seed on the same batches; it prints the copy loss curve and the first step at which
the loss (mean of the last 25 steps) falls below 1 nat.

    python -m bench.induction --steps 800 --threads 1
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from longtrain.config import ModelConfig, OptimConfig, RopeConfig
from longtrain.model.transformer import Transformer
from longtrain.optim.loss import IGNORE_INDEX
from longtrain.optim.optimizer import build_optimizer

PRINTABLE = (32, 127)  # byte ids of printable ASCII
BOS = 256  # the byte tokenizer's BOS


def copy_sequence(rng: np.random.Generator, seq_len: int, max_gap: int = 16, seg_len: tuple[int, int] = (6, 17)):
    """(input_ids, labels) of one sequence: random segments, half of them copies of earlier ones."""
    tokens, labelled, segments = [BOS], [False], []
    while len(tokens) < seq_len + 1:
        gap = rng.integers(*PRINTABLE, int(rng.integers(0, max_gap))).tolist()
        tokens += gap
        labelled += [False] * len(gap)
        if segments and rng.random() < 0.5:
            seg = segments[int(rng.integers(len(segments)))]
            labelled += [False] + [True] * (len(seg) - 1)  # a copy's first token is unpredictable
        else:
            seg = rng.integers(*PRINTABLE, int(rng.integers(*seg_len))).tolist()
            segments.append(seg)
            labelled += [False] * len(seg)
        tokens += seg
    ids, mask = torch.tensor(tokens[: seq_len + 1]), torch.tensor(labelled[: seq_len + 1])
    return ids[:-1], torch.where(mask[1:], ids[1:], IGNORE_INDEX)


def train(tied: bool, args: argparse.Namespace) -> list[float]:
    torch.manual_seed(args.seed)
    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads, tie_embeddings=tied)
    model = Transformer(cfg, RopeConfig(), vocab_size=259)
    optimizer = build_optimizer(model, OptimConfig(lr=args.lr, weight_decay=0.0))
    rng = np.random.default_rng(args.seed)
    positions = torch.arange(args.seq_len).expand(args.batch, -1)
    losses, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        ids, labels = map(torch.stack, zip(*(copy_sequence(rng, args.seq_len) for _ in range(args.batch))))
        sums = model(ids, positions, labels)
        (sums.objective / sums.tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(sums.ce.detach() / sums.tokens))
        if step % 50 == 0:
            print(f"  {'tied' if tied else 'untied':>6} step {step:>4}  copy loss {np.mean(losses[-25:]):.3f}"
                  f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    return losses


def transition_step(losses: list[float], threshold: float = 1.0) -> int | None:
    for step in range(25, len(losses) + 1):
        if np.mean(losses[step - 25 : step]) < threshold:
            return step
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {tied: train(tied, args) for tied in (True, False)}
    print(f"{'embeddings':>10} {'final copy loss':>16} {'step loss < 1':>14}")
    for tied, losses in results.items():
        step = transition_step(losses)
        print(f"{'tied' if tied else 'untied':>10} {np.mean(losses[-25:]):>16.3f} {step if step else 'never':>14}")


if __name__ == "__main__":
    main()
