"""The run folder's records, typed, each with one reader and one writer.

    run.dir/run.json           RunRecord: the run's identity (longtrain/run_dir.py)
    run.dir/STAGE/gate.json    GateRecord: a stage's gate decision (longtrain/curriculum.py)
    run.dir/job.json           JobRecord: how a job of train.py -m ended (longtrain/sweep_job.py)

The reports and the sweep read them back from here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar

RUN_FILE = "run.json"
GATE_FILE = "gate.json"
JOB_FILE = "job.json"

R = TypeVar("R")


@dataclass
class RunRecord:
    id: str  # names the wandb runs; recorded in every checkpoint, so retention prunes only this run's
    created: Optional[str] = None  # always written; a run.json made by hand may lack it


def read_run_record(run_dir: Path) -> Optional[RunRecord]:
    return _read(run_dir / RUN_FILE, RunRecord)


def write_run_record(run_dir: Path, record: RunRecord) -> None:
    _write(run_dir / RUN_FILE, record, indent=1)


def short_loss_limit(reference: float, max_increase: float) -> float:
    """The highest short-context loss a gate accepts, given the stage before's."""
    return (1 + max_increase) * reference


@dataclass
class GateRecord:
    stage: str
    seq_len: int
    passed: bool
    forced: bool  # entered although the stage before had not passed its gate
    recall: float
    recall_before: Optional[float]  # the starting checkpoint's recall at this length
    short_loss: float
    reference_short_loss: Optional[float]  # the stage before's short loss
    min_recall: float
    max_short_loss_increase: float
    extra_steps: int
    step: int
    checkpoint: str
    rope: dict
    # Every task evaluated (the single needle too): {"recall", "recall_before", "min_recall"
    # (null: reported only), "worst_cell"}; defaults let a gate.json from before them load.
    tasks: dict[str, dict] = field(default_factory=dict)
    min_cell_recall: float = 0.0

    def short_loss_limit(self) -> Optional[float]:
        """The short-context loss this gate allowed (None: the first stage has no reference)."""
        if self.reference_short_loss is None:
            return None
        return short_loss_limit(self.reference_short_loss, self.max_short_loss_increase)


def read_gate(stage_dir: Path) -> Optional[GateRecord]:
    return _read(stage_dir / GATE_FILE, GateRecord)


def write_gate(stage_dir: Path, record: GateRecord) -> None:
    _write(stage_dir / GATE_FILE, record, indent=2)


@dataclass
class JobRecord:
    job: int
    overrides: list[str]
    status: str  # passed | gate failed | config error | stage error | diverged | preempted | parallel error
    code: int  # the exit code a single run would have had
    wall_s: float
    stages: list[str]  # stage folder names the job was to run, in order
    objective: Optional[float]


def read_job_record(run_dir: Path) -> Optional[JobRecord]:
    return _read(run_dir / JOB_FILE, JobRecord)


def write_job_record(run_dir: Path, record: JobRecord) -> None:
    _write(run_dir / JOB_FILE, record, indent=1)


def _read(path: Path, record: type[R]) -> Optional[R]:
    return record(**json.loads(path.read_text())) if path.is_file() else None


def _write(path: Path, record: Any, indent: int) -> None:
    """The record as JSON (the indent each file has always had), its folder made if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(record), indent=indent))
