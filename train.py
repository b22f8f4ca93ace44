"""longtrain entry point: python train.py [overrides], or torchrun ... train.py [overrides].

All logic lives in longtrain/; this file turns Hydra's config into one validated config
per curriculum stage, checks that the device can run it (longtrain/hardware.py), reports
every bad input as one line (before any compute, nothing written), and runs the whole
curriculum, or the one stage named by `stage=...`.

Exit codes: 0 done; 1 a stage failed its gate, diverged or a rank hung; 2 bad input;
75 stopped by SIGTERM/SIGUSR1 after saving a checkpoint (requeue with run.resume=auto).
With -m (multirun) each job gets its own run folder, and a failing job does not stop the
jobs after it; the sweep exits with the worst job's code.
"""

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# Everything runs offline: datasets/transformers must never try the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Hydra raises its errors to us instead of printing them over several lines.
os.environ["HYDRA_FULL_ERROR"] = "1"

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import torch  # noqa: E402

from longtrain import preemption  # noqa: E402
from longtrain.checkpoint import barrier  # noqa: E402
from longtrain.cli import hydra_error_line, plan_table, sweep_root, torchrun_env_from_submitit  # noqa: E402
from longtrain.config import ConfigError  # noqa: E402
from longtrain.curriculum import GateFailed, StageError, compose_stage_configs, run_curriculum, stages_to_run, summary_table  # noqa: E402
from longtrain.parallel.mesh import CollectiveTimeout, collective_timeouts, init_parallel, world_size_from_env  # noqa: E402
from longtrain.preflight import preflight  # noqa: E402
from longtrain.reporting.run_report import report_at_end  # noqa: E402
from longtrain.run_dir import clear_stage_folders  # noqa: E402
from longtrain.run_files import JobRecord, write_job_record  # noqa: E402
from longtrain.sweep_job import job_objective  # noqa: E402
from longtrain.trainer.checkpointer import Diverged  # noqa: E402


class Stop(Exception):
    """Ends a single run with its exit code, or a multirun job with its status (the sweep goes on)."""

    def __init__(self, kind: str, message: str, code: int, status: str | None = None):
        super().__init__(message)
        self.kind, self.code, self.status = kind, code, status or kind


@dataclass
class Job:
    """What the job record needs, filled in as the command goes."""

    overrides: list[str]
    run_dir: str  # where its stages' folders are (and, in a multirun, its job.json)
    stages: list[str] = field(default_factory=list)  # stage folder names this command runs
    dry_run: bool = False


def is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def job_overrides(hydra_cfg: DictConfig) -> tuple[list[str], int | None, str | None]:
    """The command line's overrides and, in a multirun, the job's number and run.dir: its
    own folder, the sweep's (multirun/<date>/<job>) or run.dir/<job>."""
    overrides = list(hydra_cfg.overrides.task)
    if hydra_cfg.mode != RunMode.MULTIRUN:
        sweeps = [o for o in overrides if o.lstrip("+").startswith("sweep=")]
        if sweeps:  # without -m Hydra would run the recipe's defaults once, as if one job
            raise ConfigError(f"sweep: {sweeps[0]} is a sweep (one job per setting); add -m: python train.py -m {sweeps[0]} ...")
        return overrides, None, None
    job = int(hydra_cfg.job.num)
    given = any(o.lstrip("+").startswith("run.dir=") for o in overrides)
    # Under torchrun each rank would date the sweep folder by its own clock; a submitit
    # job's folder was named once, by the process that launched the sweep.
    if not given and world_size_from_env() > 1 and "SUBMITIT_EXECUTOR" not in os.environ:
        raise ConfigError("run.dir: a multirun under torchrun needs run.dir=FOLDER (jobs go to FOLDER/<job>)")
    run_dir = os.path.join(sweep_root(overrides, hydra_cfg.runtime.output_dir), str(job)) if given else hydra_cfg.runtime.output_dir
    return [*(o for o in overrides if not o.lstrip("+").startswith("run.dir=")), f"run.dir={run_dir}"], job, run_dir


@hydra.main(config_path="configs", config_name="config", version_base=None)
def main(raw: DictConfig) -> float | None:
    """Run the command; return its objective (longtrain/sweep_job.py), which a sweeper
    maximises. A multirun job that fails prints its one line, records it in job.json and
    returns, so the sweep goes on; a single run exits with the failure's code."""
    torchrun_env_from_submitit()
    hydra_cfg = HydraConfig.get()
    started = time.monotonic()
    job_number = int(hydra_cfg.job.num) if hydra_cfg.mode == RunMode.MULTIRUN else None
    job = Job(list(hydra_cfg.overrides.task), hydra_cfg.runtime.output_dir)
    try:
        run_command(hydra_cfg, job)
        status, code = "passed", 0
    except Stop as stop:
        if is_rank0():  # every rank fails the same way; one line is enough
            print(f"{stop.kind}: {stop}", file=sys.stderr, flush=True)
        if job_number is None:
            sys.exit(stop.code)
        status, code = stop.status, stop.code
    objective = job_objective(Path(job.run_dir), job.stages)
    if job_number is not None and not job.dry_run and is_rank0():
        record = JobRecord(job_number, job.overrides, status, code, round(time.monotonic() - started, 1), job.stages, objective)
        write_job_record(Path(job.run_dir), record)
    return objective


def run_command(hydra_cfg: DictConfig, job: Job) -> None:
    """Validate, then run the curriculum or the one stage named by ``stage=...``; raise Stop."""
    chosen = hydra_cfg.runtime.choices.get("stage")
    try:
        job.overrides, job_number, run_dir = job_overrides(hydra_cfg)
        if run_dir is not None:  # a multirun job: its record goes there even if its config is bad
            job.run_dir = run_dir
        if job_number is not None and is_rank0():
            print(f"=== job {job_number}: {' '.join(job.overrides)}", flush=True)
        stages = compose_stage_configs(job.overrides, only=chosen)
        job.run_dir = stages[0].run.dir
        names = stages[0].curriculum.stages
        to_run = stages_to_run(stages, chosen)
        job.stages = [cfg.stage.name for cfg in to_run]
        device = preflight(to_run, world_size_from_env())
    except ConfigError as e:
        raise Stop("config error", str(e), 2) from None
    if stages[0].run.dry_run:
        job.dry_run = True
        if is_rank0():
            print(plan_table(to_run, world_size_from_env()))
        return

    if stages[0].run.threads:
        torch.set_num_threads(stages[0].run.threads)
    preemption.install_handlers()
    pd = init_parallel(stages[0].parallel, device)
    if pd.is_rank0:
        clear_stage_folders(to_run)
    barrier()
    stopped = None  # how the run ended, if not passed; a run that trained gets its report first
    try:
        with collective_timeouts(pd):
            records = run_curriculum(stages, pd, only=names.index(chosen) if chosen is not None else None)
    except ConfigError as e:  # found only once a stage reads its data (a file it cannot use)
        raise Stop("config error", str(e), 2) from None
    except GateFailed as e:
        stopped = Stop("stage error", str(e), 1, status="gate failed")
    except StageError as e:  # a stage could not start
        raise Stop("stage error", str(e), 1) from None
    except Diverged as e:
        stopped = Stop("diverged", str(e), 1)
    except preemption.Preempted as e:
        stopped = Stop("preempted", str(e), preemption.PREEMPTED_EXIT_CODE)
    except CollectiveTimeout as e:
        stopped = Stop("parallel error", str(e), 1)
    # The report is most useful after a failed gate. Other ranks may exit first; torchrun then
    # sends rank 0 SIGTERM, which preemption records, and kills it only 30 s later.
    if pd.is_rank0:
        report_at_end(stages[0])
    if stopped is not None:
        raise stopped
    if pd.is_rank0:
        print(summary_table(records))


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # Hydra's own errors: an unknown key or option, a parse error
        line = hydra_error_line(e)
        if line is None:
            raise
        if is_rank0():
            print(f"config error: {line}", file=sys.stderr)
        sys.exit(2)
