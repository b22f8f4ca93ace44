"""RULER-style task suite: recall per task × context length, each over a depth grid.

Every task is a retrieval kind (``longtrain/data/retrieval.py``): the single needle
(``passkey``), ``multikey``, ``multiquery``, ``multivalue``, ``vartrack``, ``cwe``, and the
training kinds. Each (task, length) cell is a needle grid (:func:`run_needle_grid`): held-
out keys and validation haystacks, scored by teacher-forced exact match of the whole
answer. The gate evaluates its tasks through :func:`run_suite` too, sharded over cp by
the trainer's forward.

    python -m longtrain.eval.suite RUN/STAGE/checkpoints/step_00000300 --lengths 512 2048 \\
        --tasks passkey multikey vartrack
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import torch

from longtrain.config import RETRIEVAL_KINDS, RetrievalConfig
from longtrain.data.retrieval import Haystack, build_haystack
from longtrain.data.tokenizer import Tokenizer
from longtrain.eval.grid import pyplot
from longtrain.eval.needle import DEFAULT_DEPTHS, NeedleGrid, fit_error, run_needle_grid
from longtrain.model.load import ScoreFn, load_source

DEFAULT_TASKS = ("passkey", "multikey", "multiquery", "multivalue", "vartrack", "cwe")


def run_suite(
    score: ScoreFn,
    tokenizer: Tokenizer,
    haystack: Haystack,
    tasks: Sequence[str],
    lengths: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS,
    trials: int = 4,
    seed: int = 0,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    cfg: Optional[RetrievalConfig] = None,
) -> dict[str, NeedleGrid]:
    """Each task's needle grid over ``lengths`` × ``depths``; a task's samples do not
    depend on which other tasks run."""
    return {
        task: run_needle_grid(score, tokenizer, haystack, lengths, depths, trials, seed, batch_size, task, device, cfg)
        for task in tasks
    }


def suite_table(grids: dict[str, NeedleGrid]) -> str:
    """Tasks × lengths, each cell the mean recall over the depth grid."""
    lengths = next(iter(grids.values())).lengths
    head = f"{'task':<11} | " + " ".join(f"{n:>7}" for n in lengths)
    rows = [head, "-" * len(head)]
    for task, grid in grids.items():
        rows.append(f"{task:<11} | " + " ".join(f"{grid.recall_at(n):>7.2f}" for n in lengths))
    return "\n".join(rows)


def save_plot(grids: dict[str, NeedleGrid], path: Path, title: str) -> None:
    """Recall against context length, one line per task (RULER's picture)."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for task, grid in grids.items():
        ax.plot(grid.lengths, [grid.recall_at(n) for n in grid.lengths], marker="o", label=task)
    ax.set_xscale("log", base=2)
    ax.set_xticks(grid.lengths, [str(n) for n in grid.lengths])
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("recall (mean over depths)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_suite(grids: dict[str, NeedleGrid], out_dir: Path, extra: dict) -> tuple[Path, Path]:
    """``suite.json`` (every task's grid and mean recall per length) and ``suite.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        **extra,
        "recall": {task: {str(n): grid.recall_at(n) for n in grid.lengths} for task, grid in grids.items()},
        "grids": {task: asdict(grid) for task, grid in grids.items()},
    }
    json_path, png_path = out_dir / "suite.json", out_dir / "suite.png"
    json_path.write_text(json.dumps(record, indent=2))
    grid = next(iter(grids.values()))
    save_plot(grids, png_path, f"{extra.get('checkpoint', '')}\n{len(grid.depths)} depths × {grid.trials} trials per point")
    return json_path, png_path


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m longtrain.eval.suite", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint folder (step_XXXXXXXX), or hf:FOLDER for a Hugging Face folder")
    p.add_argument("--lengths", type=int, nargs="+", help="context lengths (default: the checkpoint's seq_len)")
    p.add_argument("--tasks", nargs="+", choices=RETRIEVAL_KINDS, default=list(DEFAULT_TASKS), metavar="TASK",
                   help=f"retrieval kinds (default: {' '.join(DEFAULT_TASKS)}; valid: {', '.join(RETRIEVAL_KINDS)})")
    p.add_argument("--depths", type=float, nargs="+", help="depths in percent (default: 0 10 ... 100)")
    p.add_argument("--trials", type=int, default=4, help="samples per (task, length, depth) cell")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="output folder (default: CHECKPOINT/suite)")
    args = p.parse_args(argv)
    if args.trials < 1 or any(not 0 <= d <= 100 for d in args.depths or []):
        p.error("--trials must be >= 1 and --depths percentages in [0, 100]")

    score, cfg, tokenizer, device, source = load_source(args.checkpoint)
    depths = [d / 100 for d in args.depths] if args.depths else list(DEFAULT_DEPTHS)
    lengths = args.lengths or [cfg.stage.seq_len]
    for task in args.tasks:
        for length in lengths:
            if (why := fit_error(tokenizer, task, length, cfg.retrieval)) is not None:
                p.error(f"--tasks {task} does not fit --lengths {length}: {why}")
    grids = run_suite(
        score, tokenizer, build_haystack(cfg, tokenizer, "val"), list(dict.fromkeys(args.tasks)), lengths, depths,
        args.trials, args.seed, args.batch_size, device, cfg.retrieval,
    )
    out = args.out or source / "suite"
    json_path, png_path = write_suite(grids, out, {"checkpoint": args.checkpoint, "seed": args.seed})
    print(suite_table(grids))
    print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    # Everything runs offline: transformers and datasets must never try the Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    main()
