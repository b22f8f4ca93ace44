"""Stop cleanly when asked: SIGTERM (SLURM, Kubernetes) or SIGUSR1 (SLURM's ``--signal``)
→ finish the current step, save a checkpoint, exit with PREEMPTED_EXIT_CODE; Ctrl-C
(SIGINT) does the same inside the step loop and exits with INTERRUPTED_EXIT_CODE.

The handler only records the signal; the training loop asks :func:`stop_requested` after
every step. Ranks receive the signal at different moments, so the decision is agreed over
all ranks (any rank that got it stops them all at the same step).

Ctrl-C outside the step loop (data preparation, a gate's evaluation) has no step to
finish: it raises KeyboardInterrupt, which ``cli.main`` turns into one line and 130. A
second Ctrl-C stops the process at once (``os._exit``): a checkpoint being written is
left in its ``.tmp`` folder, which ``run.resume=auto`` never loads.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from types import FrameType
from typing import Iterator, Optional

import torch

from longtrain.parallel.mesh import ParallelDims, all_reduce_max

# EX_TEMPFAIL: "try again later". A launcher requeues on it; the run resumes with run.resume=auto.
PREEMPTED_EXIT_CODE = 75
# 128 + SIGINT: what a shell reports for a command ended by Ctrl-C.
INTERRUPTED_EXIT_CODE = 130
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# A terminal's Ctrl-C reaches every rank, and torchrun forwards its own copy moments later:
# a SIGINT this soon after the first is the same key press, not a second one.
SAME_PRESS_S = 0.5

_received: Optional[int] = None
_interrupted_at: Optional[float] = None  # when the first Ctrl-C came
_deferring = False  # inside the step loop: Ctrl-C waits for the step to end


class Preempted(Exception):
    """A stop signal arrived; the run saved its state at ``step`` (75 for SIGTERM/SIGUSR1, 130 for SIGINT)."""

    def __init__(self, message: str, signal_name: Optional[str], step: int):
        super().__init__(message)
        self.signal_name, self.step = signal_name, step


def _record(signum: int, frame: Optional[FrameType]) -> None:
    global _received
    _received = signum


def _interrupt(signum: int, frame: Optional[FrameType]) -> None:
    """Ctrl-C: the first is recorded (in the step loop) or raised (outside it); a second stops now."""
    global _received, _interrupted_at
    now = time.monotonic()
    if _interrupted_at is not None:
        if now - _interrupted_at > SAME_PRESS_S:
            stop_now()
        return
    _interrupted_at = now
    if not _deferring:
        raise KeyboardInterrupt
    _received = signum


def stop_now() -> None:
    """The second Ctrl-C: one line and exit, no cleanup (that is what the user asked for)."""
    os.write(2, b"interrupted again: stopped at once; a checkpoint being written is discarded, "
                b"run.resume=auto takes the last complete one\n")
    os._exit(INTERRUPTED_EXIT_CODE)


def install_handlers() -> None:
    """Record SIGTERM / SIGUSR1 instead of dying, and take over Ctrl-C (call from the main thread)."""
    global _received, _interrupted_at
    _received = _interrupted_at = None  # a new run (tests run several in one process)
    for sig in SIGNALS:
        signal.signal(sig, _record)
    signal.signal(signal.SIGINT, _interrupt)


@contextlib.contextmanager
def deferring_interrupts() -> Iterator[None]:
    """Inside: a first Ctrl-C lets the step finish and the loop save (see :func:`stop_requested`)."""
    global _deferring
    before, _deferring = _deferring, True
    try:
        yield
    finally:
        _deferring = before
    if _received == signal.SIGINT:  # it came during the stage's final save: nothing left to finish
        raise KeyboardInterrupt


def stop_requested(pd: ParallelDims) -> Optional[str]:
    """The stop signal any rank received, agreed by all (a collective: every rank must call
    it), or None. If ranks got different ones, the highest number wins: SIGTERM over
    SIGUSR1 over SIGINT, so a preempted job still exits 75 and is requeued."""
    flag = torch.tensor(float(_received or 0), device=pd.device)
    agreed = int(all_reduce_max(flag, pd).item())
    return signal.Signals(agreed).name if agreed else None
