"""A needle grid (recall over context lengths × needle depths) and its heatmap.

Apart from longtrain/eval/needle.py, which measures grids, so that reading and drawing
them (the run report) does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np


@dataclass
class NeedleGrid:
    kind: str
    lengths: list[int]
    depths: list[float]
    trials: int
    recall: list[list[float]]  # [length][depth]

    def recall_at(self, length: int) -> float:
        """Mean recall over the depth grid at one length (what a gate compares)."""
        return float(np.mean(self.recall[self.lengths.index(length)]))

    def table(self) -> str:
        head = f"{'length':>8} | " + " ".join(f"{d * 100:>4.0f}%" for d in self.depths) + " |  mean"
        rows = [head, "-" * len(head)]
        for length, row in zip(self.lengths, self.recall):
            cells = " ".join(f"{r:>5.2f}" for r in row)
            rows.append(f"{length:>8} | {cells} | {self.recall_at(length):>5.2f}")
        return "\n".join(rows)


def recall_text(recall: float, threshold: Optional[float] = None) -> str:
    """A recall to two decimals, or more where two would round one below its threshold up
    to it: 104 of 110 (0.9455) against 0.95 reads 0.945, not a failing "0.95"."""
    for digits in range(2, 6):
        text = f"{recall:.{digits}f}"
        if threshold is None or not recall < threshold <= float(text):
            break
    return text


def draw_heatmap(ax: Any, recall: Sequence[Sequence[float]], depths: Sequence[float], row_labels: Sequence[str],
                 title: str, ylabel: str = "context length (tokens)") -> Any:
    """Recall per (row, depth) on ``ax``, each cell labelled; returns the image (for a colorbar).

    One drawing for the per-stage ``needle.png`` and the run report's side-by-side figure.
    """
    data = np.asarray(recall, dtype=float)
    im = ax.imshow(data, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(depths)), [f"{d * 100:.0f}" for d in depths])
    ax.set_yticks(range(len(row_labels)), list(row_labels))
    ax.set_xlabel("needle depth (%)")
    ax.set_ylabel(ylabel)
    for (i, j), r in np.ndenumerate(data):
        ax.text(j, i, f"{r:.2f}", ha="center", va="center", fontsize=9)
    ax.set_title(title, fontsize=10)
    return im


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, imported on first use: the figures go to files,
    never to a display, and a command that draws nothing does not pay for the import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_heatmap(grid: NeedleGrid, path: Path, title: str = "") -> None:
    plt = pyplot()

    # Constrained layout sizes the axes around their labels and title, so none is cut.
    fig, ax = plt.subplots(figsize=(2.5 + 0.55 * len(grid.depths), 2.0 + 0.45 * len(grid.lengths)),
                           layout="constrained")
    im = draw_heatmap(ax, grid.recall, grid.depths, [str(n) for n in grid.lengths],
                      title or f"{grid.kind} recall, {grid.trials} trials per cell")
    fig.colorbar(im, ax=ax, label="recall")
    fig.savefig(path, dpi=120)
    plt.close(fig)
