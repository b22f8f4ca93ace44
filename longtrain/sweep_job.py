"""What a multirun job leaves for the sweep's table and its sweeper.

Every job of ``train.py -m`` writes ``job.json`` into its run folder (rank 0, never in a
dry run): its overrides, status, exit code, wall time, the stages it ran and its
objective. The objective is what a sweeper (Optuna) maximises: the needle recall of the
last stage the job gated, minus 1 when that stage's short-context loss broke its limit,
so every trial that keeps short-context quality ranks above every trial that does not.
A failed gate still has a value: it is a finished trial, not a crash. A job that measured
nothing (a config error, preempted before its gate) has none (null), which Optuna records
as a failed trial, and the search goes on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from longtrain.run_dir import read_gate, short_loss_limit

JOB_FILE = "job.json"


@dataclass
class JobRecord:
    job: int
    overrides: list[str]
    status: str  # passed | gate failed | config error | stage error | diverged | preempted | parallel error
    code: int  # the exit code a single run would have had
    wall_s: float
    stages: list[str]  # stage folder names the job was to run, in order
    objective: Optional[float]


def gate_limit(gate: dict) -> Optional[float]:
    """The short-context loss a stage's gate allowed (None: the first stage has no reference)."""
    reference = gate["reference_short_loss"]
    return None if reference is None else short_loss_limit(reference, gate["max_short_loss_increase"])


def gate_objective(gate: dict) -> float:
    limit = gate_limit(gate)
    return gate["recall"] - (1.0 if limit is not None and gate["short_loss"] > limit else 0.0)


def job_objective(run_dir: Path, stages: list[str]) -> Optional[float]:
    """The objective of the last of ``stages`` that wrote a gate record; None if none did."""
    for name in reversed(stages):
        gate = read_gate(run_dir / name)
        if gate is not None:
            return gate_objective(gate)
    return None


def write_job_record(run_dir: Path, record: JobRecord) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / JOB_FILE).write_text(json.dumps(asdict(record), indent=1))


def read_job_record(run_dir: Path) -> Optional[JobRecord]:
    path = run_dir / JOB_FILE
    return JobRecord(**json.loads(path.read_text())) if path.is_file() else None

