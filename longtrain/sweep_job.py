"""What a multirun job leaves for the sweep's table and its sweeper.

Every job of ``train.py -m`` writes ``job.json`` (longtrain/run_files.py) into its run folder (rank 0, never in a
dry run): its overrides, status, exit code, wall time, the stages it ran and its
objective. The objective is what a sweeper (Optuna) maximises: the needle recall of the
last stage the job gated, minus 1 when that stage's short-context loss broke its limit,
so every trial that keeps short-context quality ranks above every trial that does not.
A failed gate still has a value: it is a finished trial, not a crash. A job that measured
nothing (a config error, preempted before its gate) has none (null), which Optuna records
as a failed trial, and the search goes on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from longtrain.run_files import GateRecord, read_gate


def gate_objective(gate: GateRecord) -> float:
    limit = gate.short_loss_limit()
    return gate.recall - (1.0 if limit is not None and gate.short_loss > limit else 0.0)


def job_objective(run_dir: Path, stages: list[str]) -> Optional[float]:
    """The objective of the last of ``stages`` that wrote a gate record; None if none did."""
    for name in reversed(stages):
        gate = read_gate(run_dir / name)
        if gate is not None:
            return gate_objective(gate)
    return None
