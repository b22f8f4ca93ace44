"""Stop cleanly when the scheduler asks: SIGTERM (SLURM, Kubernetes) or SIGUSR1 (SLURM's
``--signal``) → finish the current step, save a checkpoint, exit with PREEMPTED_EXIT_CODE.

The handler only records the signal; the training loop asks :func:`stop_requested` after
every step. Ranks receive the signal at different moments, so the decision is agreed over
all ranks (any rank that got it stops them all at the same step).
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Optional

import torch

from longtrain.parallel.mesh import ParallelDims, all_reduce_max

# EX_TEMPFAIL: "try again later". A launcher requeues on it; the run resumes with run.resume=auto.
PREEMPTED_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: Optional[int] = None


class Preempted(Exception):
    """A stop signal arrived; the run saved its state and should exit with PREEMPTED_EXIT_CODE."""


def _record(signum: int, frame: Optional[FrameType]) -> None:
    global _received
    _received = signum


def install_handlers() -> None:
    """Record SIGTERM / SIGUSR1 instead of dying (call from the main thread)."""
    for sig in SIGNALS:
        signal.signal(sig, _record)


def received() -> Optional[str]:
    return signal.Signals(_received).name if _received is not None else None


def stop_requested(pd: ParallelDims) -> bool:
    """Whether any rank received a stop signal (a collective: every rank must call it)."""
    flag = torch.tensor(float(_received is not None), device=pd.device)
    return bool(all_reduce_max(flag, pd).item())
