"""Run train.py (or torchrun train.py) as a user would, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "train.py")

# The CPU demo's first stage cut to seconds: a few steps, a one-needle gate, small data.
QUICK = [
    "preset=cpu_demo", "stage=cpu/induction", "stage.steps=6", "run.checkpoint_every=2", "eval.val_every=0",
    "gate.trials=1", "gate.depths=[0.5]", "gate.short_val_samples=2", "gate.max_extra_steps=0", "gate.min_cell_recall=0",
    "logging.progress=false", "data.max_docs=30", "eval.position_buckets=0", "run.threads=1",
    "logging.report=false",  # seconds of figures per run; tests/test_report.py turns it on
]


def env() -> dict[str, str]:
    # The checkout under test, wherever it is (CI clones it elsewhere).
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def train(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, cwd=cwd, env=env(), timeout=timeout)


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", TRAIN, *args]


def train_losses(stage_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
