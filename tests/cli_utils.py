"""Run train.py (or torchrun train.py) as a user would: in a subprocess (the e2e tier), or
its ``main(argv)`` in this process (the fast tier), with the same result either way."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

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


def run_main(main: Callable[[list[str]], int], argv: Sequence[str], cwd: Path) -> subprocess.CompletedProcess:
    """``main(argv)`` in this process, from ``cwd``, as a process would run it: its exit code
    and what it printed. The signal handlers a run installs are put back afterwards."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(argv))
            except SystemExit as e:  # a module's main that exits instead of returning
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        os.chdir(here)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return subprocess.CompletedProcess(list(argv), code, out.getvalue(), err.getvalue())


def train_in_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` in this process (longtrain.cli.main)."""
    from longtrain.cli import main

    return run_main(main, args, cwd)
