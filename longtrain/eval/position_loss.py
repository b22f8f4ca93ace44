"""Loss by position: does a token far into a long document benefit from the context?

Windows of ``seq_len + 1`` tokens are cut from validation documents at least that long,
each lying within one document and starting at its BOS, so position p has exactly p
tokens of its own document before it. The mean next-token loss per position bucket
falls with position when the model uses its context; a flat tail means it does not.

    python -m longtrain.eval.position_loss RUN/STAGE/checkpoints/step_00000300 --seq-len 2048
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from longtrain.data.shards import open_prepared
from longtrain.eval.grid import pyplot
from longtrain.model.load import ScoreFn, load_scorer


@dataclass
class PositionLoss:
    seq_len: int
    windows: int
    bucket_starts: list[int]  # bucket b covers positions [starts[b], starts[b+1]) (last: to seq_len)
    loss: list[float]  # mean loss (nats/token) per bucket


def document_windows(tokens: np.ndarray, doc_starts: np.ndarray, seq_len: int, max_windows: int) -> list[int]:
    """Starts of non-overlapping windows of seq_len + 1 tokens, each inside one document.

    Every document yields windows from its BOS on; at most ``max_windows`` are kept,
    evenly spaced over the list so that many documents are represented.
    """
    ends = np.append(doc_starts[1:], len(tokens))
    starts = [s for b, e in zip(doc_starts, ends) for s in range(int(b), int(e) - seq_len, seq_len)]
    if not starts:
        raise ValueError(f"no validation document has the {seq_len + 1} tokens a window of seq_len={seq_len} needs")
    keep = np.unique(np.linspace(0, len(starts) - 1, min(max_windows, len(starts))).round().astype(int))
    return [starts[k] for k in keep]


@torch.no_grad()
def position_loss(
    score: ScoreFn,
    tokens: np.ndarray,
    doc_starts: np.ndarray,
    seq_len: int,
    num_buckets: int = 16,
    max_windows: int = 16,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
) -> PositionLoss:
    """Mean loss per position bucket over single-document windows of the validation stream
    (per-token losses from ``score``, never [T, vocab] logits)."""
    if not 0 < num_buckets <= seq_len:
        raise ValueError(f"num_buckets must be in [1, seq_len={seq_len}], got {num_buckets}")
    starts = document_windows(tokens, doc_starts, seq_len, max_windows)
    loss_sum = torch.zeros(seq_len, dtype=torch.float64)
    positions = torch.arange(seq_len)
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        windows = torch.from_numpy(np.stack([tokens[s : s + seq_len + 1].astype(np.int64) for s in chunk]))
        windows = windows.to(device)
        loss = score(windows[:, :-1], positions.to(device).expand(len(chunk), -1), windows[:, 1:]).loss
        loss_sum += loss.sum(dim=0).double().cpu()
    per_position = loss_sum / len(starts)
    edges = np.linspace(0, seq_len, num_buckets + 1).round().astype(int)
    means = [float(per_position[a:b].mean()) for a, b in zip(edges[:-1], edges[1:])]
    return PositionLoss(seq_len, len(starts), edges[:-1].tolist(), means)


def write_results(result: PositionLoss, out_dir: Path, extra: Optional[dict] = None) -> tuple[Path, Path]:
    """``position_loss.json`` and ``position_loss.png`` in ``out_dir``."""
    plt = pyplot()

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "position_loss.json", out_dir / "position_loss.png"
    json_path.write_text(json.dumps({**asdict(result), **(extra or {})}, indent=2))

    ends = result.bucket_starts[1:] + [result.seq_len]
    centres = [(a + b) / 2 for a, b in zip(result.bucket_starts, ends)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(centres, result.loss, marker="o")
    ax.set_xlabel("position in document (tokens)")
    ax.set_ylabel("mean loss (nats/token)")
    ax.set_title(f"loss by position, {result.windows} windows of {result.seq_len}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return json_path, png_path


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m longtrain.eval.position_loss", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a checkpoint folder (step_XXXXXXXX)")
    p.add_argument("--seq-len", type=int, help="window length (default: the checkpoint's seq_len)")
    p.add_argument("--buckets", type=int, default=16)
    p.add_argument("--windows", type=int, default=16, help="at most this many windows")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", type=Path, help="output folder (default: CHECKPOINT/position_loss)")
    args = p.parse_args(argv)

    score, cfg, tokenizer, device = load_scorer(args.checkpoint)
    tokens = open_prepared(cfg).stream("val")
    doc_starts = tokens.doc_starts
    seq_len = args.seq_len or cfg.stage.seq_len
    result = position_loss(score, tokens, doc_starts, seq_len, args.buckets, args.windows, args.batch_size, device)
    out = args.out or args.checkpoint / "position_loss"
    json_path, png_path = write_results(result, out, {"checkpoint": str(args.checkpoint)})
    for start, loss in zip(result.bucket_starts, result.loss):
        print(f"{start:>8}  {loss:.4f}")
    print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    # Everything runs offline: transformers and datasets must never try the Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    main()
