"""Needle-in-a-haystack grid: recall over context lengths × needle depths.

Each cell holds ``trials`` samples from the validation haystack with evaluation-only
keys. A sample counts as recalled when greedy decoding would produce its answer exactly.
That needs no generation loop: greedy decoding emits the answer iff at every answer
position the argmax of the logits is the answer token, given the answer's own prefix,
which is what one teacher-forced forward pass over the sample computes. Only the answer
positions are projected onto the vocabulary (:data:`ScoreFn`): [T, vocab] never exists.

Building a batch (:func:`needle_batch`) and scoring it (:func:`score_batch`) are
separate, so a sharded scorer (the trainer's evaluator) can replace the model's.

    python -m longtrain.eval.needle RUN/STAGE/checkpoints/step_00000300 --lengths 512 2048
    python -m longtrain.eval.needle hf:EXPORTED_FOLDER      # the same grid through transformers' forward
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from longtrain.config import RETRIEVAL_KINDS, RetrievalConfig
from longtrain.data.retrieval import Haystack, build_haystack, retrieval_sample
from longtrain.data.tokenizer import Tokenizer
from longtrain.eval.grid import NeedleGrid, save_heatmap
from longtrain.model.load import ScoreFn, load_source
from longtrain.optim.loss import IGNORE_INDEX

Batch = dict[str, Tensor]

DEFAULT_DEPTHS = tuple(i / 10 for i in range(11))  # 0%, 10%, ..., 100%


def needle_batch(
    tokenizer: Tokenizer,
    haystack: Haystack,
    length: int,
    cells: Sequence[tuple[float, int]],
    seed: int,
    kind: str = "passkey",
    cfg: Optional[RetrievalConfig] = None,
) -> Batch:
    """Evaluation samples of ``length`` tokens, one per (depth, trial) cell.

    Each sample's RNG is seeded by (seed, length, depth, trial) only, so a cell holds the
    same samples whatever else is evaluated or how it is batched. Keys come from the
    validation half of the key space; loss (labels) sits on the answer tokens only.
    """
    # Scoring reads the answer off the labels: exactly one answer per sample, nothing else.
    cfg = replace(cfg or RetrievalConfig(), loss="answer", kv_queries=1)
    samples = []
    for depth, trial in cells:
        rng = np.random.default_rng([seed, length, round(depth * 10_000), trial])
        s = retrieval_sample(cfg, tokenizer, haystack, rng, length, "val", kind, depth)
        samples.append(s.tensors())
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def fit_error(tokenizer: Tokenizer, task: str, length: int, cfg: Optional[RetrievalConfig] = None) -> Optional[str]:
    """Why a ``task`` sample cannot be ``length`` tokens long (None: it can), before any forward."""
    filler = Haystack.of_stream(np.arange(tokenizer.vocab_size), tokenizer)  # the length, not the text, matters
    try:
        needle_batch(tokenizer, filler, length, [(0.5, 0)], 0, task, cfg)
    except ValueError as e:
        return str(e)
    return None


@torch.no_grad()
def score_batch(score: ScoreFn, batch: Batch) -> Tensor:
    """Bool [B]: whether greedy decoding reproduces every labelled (answer) token."""
    argmax = score(batch["input_ids"], batch["position_ids"], batch["labels"]).argmax
    labels = batch["labels"].to(argmax.device)
    hit = (argmax == labels) | (labels == IGNORE_INDEX)
    return hit.all(dim=1).cpu()


@torch.no_grad()
def greedy_decode(score: ScoreFn, prompt: Tensor, n: int) -> list[int]:
    """Plain autoregressive greedy decoding of ``n`` tokens, one full forward per token: what
    :func:`score_batch` predicts without decoding, for checking it (and an export) against."""
    ids = prompt.clone()
    for _ in range(n):
        # A label on the last position only: its argmax is the next token (the label's value is unused).
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[-1] = 0
        argmax = score(ids[None], torch.arange(len(ids), device=ids.device)[None], labels[None]).argmax
        ids = torch.cat([ids, argmax[0, -1:]])
    return ids[len(prompt) :].tolist()


def run_needle_grid(
    score: ScoreFn,
    tokenizer: Tokenizer,
    haystack: Haystack,
    lengths: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS,
    trials: int = 4,
    seed: int = 0,
    batch_size: int = 8,
    kind: str = "passkey",
    device: torch.device | str = "cpu",
    cfg: Optional[RetrievalConfig] = None,
) -> NeedleGrid:
    """Recall per (length, depth); samples of one length are batched across depths."""
    recall = []
    for length in lengths:
        cells = [(d, t) for d in depths for t in range(trials)]
        hits: list[Tensor] = []
        for start in range(0, len(cells), batch_size):
            batch = needle_batch(tokenizer, haystack, length, cells[start : start + batch_size], seed, kind, cfg)
            hits.append(score_batch(score, {k: v.to(device) for k, v in batch.items()}))
        per_cell = torch.cat(hits).float().view(len(depths), trials).mean(dim=1)
        recall.append([round(float(r), 4) for r in per_cell])
    return NeedleGrid(kind, list(lengths), list(depths), trials, recall)


def write_results(
    grid: NeedleGrid, out_dir: Path, extra: Optional[dict] = None, name: str = "needle"
) -> tuple[Path, Path]:
    """``NAME.json`` (grid + mean recall per length) and ``NAME.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {**asdict(grid), "mean_recall": {str(n): grid.recall_at(n) for n in grid.lengths}, **(extra or {})}
    json_path, png_path = out_dir / f"{name}.json", out_dir / f"{name}.png"
    json_path.write_text(json.dumps(record, indent=2))
    save_heatmap(grid, png_path)
    return json_path, png_path


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m longtrain.eval.needle", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint folder (step_XXXXXXXX), or hf:FOLDER for a Hugging Face folder")
    p.add_argument("--lengths", type=int, nargs="+", help="context lengths (default: the checkpoint's seq_len)")
    p.add_argument("--depths", type=float, nargs="+", help="depths in percent (default: 0 10 ... 100)")
    p.add_argument("--trials", type=int, default=4, help="samples per cell")
    p.add_argument("--kind", choices=RETRIEVAL_KINDS, help="needle kind (default: the checkpoint's gate.kind)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="output folder (default: CHECKPOINT/needle)")
    args = p.parse_args(argv)

    score, cfg, tokenizer, device, source = load_source(args.checkpoint)
    depths = [d / 100 for d in args.depths] if args.depths else list(DEFAULT_DEPTHS)
    lengths = args.lengths or [cfg.stage.seq_len]
    haystack = build_haystack(cfg, tokenizer, "val")
    grid = run_needle_grid(
        score, tokenizer, haystack, lengths, depths, args.trials, args.seed, args.batch_size,
        args.kind or cfg.gate.kind, device, cfg.retrieval,
    )
    out = args.out or source / "needle"
    json_path, png_path = write_results(grid, out, {"checkpoint": args.checkpoint, "seed": args.seed})
    print(grid.table())
    print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    # Everything runs offline: transformers and datasets must never try the Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    main()
