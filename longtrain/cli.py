"""The train.py command: ``main(argv) -> exit code``.

``main`` composes the config with Hydra, runs the whole curriculum or the one stage named
by ``stage=...`` (one job per setting with ``-m``), reports every bad input as one line
(before any compute, nothing written; longtrain/preflight.py) and maps the outcome to an
exit code: 0 done; 1 a stage failed its gate, diverged or a rank hung; 2 bad input; 75
stopped by SIGTERM/SIGUSR1 after saving a checkpoint (requeue with run.resume=auto); 130
interrupted by Ctrl-C (in the step loop after finishing the step and saving it; a second
Ctrl-C stops at once, keeping only complete checkpoints). With
-m (multirun) each job gets its own run folder, and a failing job does not stop the jobs
after it; the sweep exits with the worst job's code (longtrain/reporting/callback.py).
Tests call ``main([...])`` in-process; train.py is its entry.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import hydra
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from longtrain import preemption
from longtrain.checkpoint import barrier
from longtrain.command_line import CONFIG_DIR, hydra_error_line, sweep_root, torchrun_env_from_submitit
from longtrain.config import Config, ConfigError
from longtrain.curriculum import GateFailed, StageError, compose_stage_configs, run_curriculum, stages_to_run, summary_table
from longtrain.data.tokenizer import build_tokenizer
from longtrain.model.transformer import Transformer
from longtrain.parallel.mesh import CollectiveTimeout, collective_timeouts, init_parallel, world_size_from_env
from longtrain.preflight import preflight
from longtrain.reporting.run_report import report_at_end
from longtrain.run_dir import clear_stage_folders
from longtrain.run_files import JobRecord, write_job_record
from longtrain.sweep_job import job_objective
from longtrain.trainer.checkpointer import Diverged
from longtrain.trainer.meter import detect_peak_tflops, estimate_line


def non_embedding_params(cfg: Config) -> int:
    """The model's parameter count as the meter takes it, from a model on the meta device (no memory, no RNG)."""
    vocab = cfg.model.vocab_size or build_tokenizer(cfg.tokenizer).vocab_size
    with torch.device("meta"):
        return Transformer(cfg.model, cfg.rope, vocab).num_params(exclude_embedding=True)


def stage_estimates(stages: list[Config], world_size: int, device: torch.device) -> str:
    """Each stage's estimated wall time on this device, the line a real run prints before its first step."""
    return "\n".join(
        estimate_line(c, non_embedding_params(c), c.stage.steps, world_size, device,
                      c.logging.peak_tflops or detect_peak_tflops(device))
        for c in stages
    )


# NCCL's defaults (TORCH_NCCL_BLOCKING_WAIT off, TORCH_NCCL_ASYNC_ERROR_HANDLING 3) leave
# the peers of a hung rank blocked on the GPU until NCCL's watchdog kills the process,
# with no line of ours. Blocking wait makes a collective that waits longer than the group's
# timeout (parallel.timeout_s) raise DistBackendError in Python instead, where
# collective_timeouts names the silent ranks; it takes precedence over async error
# handling. Set before the process group exists (NCCL reads it then); an operator's own
# setting wins. Why and what it costs: docs/operations.md, "Hung ranks".
NCCL_ENVIRONMENT = {"TORCH_NCCL_BLOCKING_WAIT": "1"}


def set_nccl_environment() -> None:
    for name, value in NCCL_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def plan_table(stages: list[Config], world_size: int) -> str:
    """``run.dry_run=true``: what the command would run, one row per stage."""
    rows = [f"{'stage':<12} {'length':>7} {'steps':>7} {'batch':>9} {'rope':<22} folder"]
    for c in stages:
        rope = c.rope.label()
        batch = f"{c.stage.global_batch_size}/{c.stage.micro_batch_size}"
        rows.append(f"{c.stage.name:<12} {c.stage.seq_len:>7} {c.stage.steps:>7} {batch:>9} {rope:<22} {Path(c.run.dir) / c.stage.name}")
    p = stages[0].parallel
    rows.append(f"world size {world_size}: dp={p.dp} × cp={p.cp}; batch = global/micro per rank; nothing written (run.dry_run)")
    return "\n".join(rows)


def main(argv: Sequence[str], prog: str = "train.py") -> int:
    """``python PROG ARGV``: compose with Hydra, run, and return the exit code (the
    failure's one line already on stderr). Tests call it in-process. ``prog`` is the
    script as the user typed it; Hydra shows it in its messages (--info, completion)."""
    # Hydra raises its errors to us instead of printing them over several lines.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    saved_argv, sys.argv = sys.argv, [prog, *argv]  # Hydra parses sys.argv
    try:
        hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)(run_job)()
    except KeyboardInterrupt:  # Ctrl-C with no step to finish: composing, preparing data, a gate
        if is_rank0():
            print(INTERRUPTED_LINE, file=sys.stderr, flush=True)
        return preemption.INTERRUPTED_EXIT_CODE
    except SystemExit as e:  # a single run's failure, a failed sweep's worst code, Hydra's own exit (--help)
        return exit_code(e)
    except Exception as e:  # Hydra's own errors: an unknown key or option, a parse error
        line = hydra_error_line(e)
        if line is None:
            raise
        if is_rank0():
            print(f"config error: {line}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved_argv
        GlobalHydra.instance().clear()  # so that the next call in this process composes afresh
    return 0


# Ctrl-C with no step to finish; the stages and checkpoints completed before it are on disk.
INTERRUPTED_LINE = "interrupted: complete checkpoints are kept; resume with run.resume=auto"


def exit_code(exit: SystemExit) -> int:
    """The status the interpreter would exit with for ``sys.exit(code)``."""
    if exit.code is None or isinstance(exit.code, int):
        return exit.code or 0
    print(exit.code, file=sys.stderr)  # sys.exit("message"): printed, status 1
    return 1


class Stop(Exception):
    """Ends a single run with its exit code, or a multirun job with its status (the sweep goes on)."""

    def __init__(self, kind: str, message: str, code: int, status: str | None = None):
        super().__init__(message)
        self.kind, self.code, self.status = kind, code, status or kind

    def line(self) -> str:
        return f"{self.kind}: {self}" if self.kind != "interrupted" else str(self)


def preempted(e: preemption.Preempted) -> Stop:
    """SIGTERM/SIGUSR1 → "preempted: ..." and 75; Ctrl-C → the one line a person expects, and 130."""
    if e.signal_name == "SIGINT":
        message = f"interrupted at step {e.step}, checkpoint saved: resume with run.resume=auto"
        return Stop("interrupted", message, preemption.INTERRUPTED_EXIT_CODE)
    return Stop("preempted", str(e), preemption.PREEMPTED_EXIT_CODE)


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


def run_job(raw: DictConfig) -> float | None:
    """Run the command; return its objective (longtrain/sweep_job.py), which a sweeper
    maximises. A multirun job that fails prints its one line, records it in job.json and
    returns, so the sweep goes on; a single run exits with the failure's code."""
    torchrun_env_from_submitit()
    hydra_cfg = HydraConfig.get()
    started = time.monotonic()
    job_number = int(hydra_cfg.job.num) if hydra_cfg.mode == RunMode.MULTIRUN else None
    job = Job(list(hydra_cfg.overrides.task), hydra_cfg.runtime.output_dir)
    try:
        run_command(raw, hydra_cfg, job)
        status, code = "passed", 0
    except Stop as stop:
        if is_rank0():  # every rank fails the same way; one line is enough
            print(stop.line(), file=sys.stderr, flush=True)
        if job_number is None or stop.code == preemption.INTERRUPTED_EXIT_CODE:  # Ctrl-C ends a sweep too
            sys.exit(stop.code)
        status, code = stop.status, stop.code
    objective = job_objective(Path(job.run_dir), job.stages)
    if job_number is not None and not job.dry_run and is_rank0():
        record = JobRecord(job_number, job.overrides, status, code, round(time.monotonic() - started, 1), job.stages, objective)
        write_job_record(Path(job.run_dir), record)
    return objective


def run_command(raw: DictConfig, hydra_cfg: DictConfig, job: Job) -> None:
    """Validate, then run the curriculum or the one stage named by ``stage=...``; raise Stop.
    ``raw`` is the command's config as Hydra composed it: its stage list is the curriculum's."""
    chosen = hydra_cfg.runtime.choices.get("stage")
    try:
        job.overrides, job_number, run_dir = job_overrides(hydra_cfg)
        if run_dir is not None:  # a multirun job: its record goes there even if its config is bad
            job.run_dir = run_dir
        if job_number is not None and is_rank0():
            print(f"=== job {job_number}: {' '.join(job.overrides)}", flush=True)
        stages = compose_stage_configs(job.overrides, only=chosen, names=raw.curriculum.stages)
        to_run = stages_to_run(stages, chosen)  # its first: the command's run, parallel, logging
        job.run_dir = to_run[0].run.dir
        job.stages = [cfg.stage.name for cfg in to_run]
        device = preflight(to_run, world_size_from_env())
    except ConfigError as e:
        raise Stop("config error", str(e), 2) from None
    if to_run[0].run.threads:  # before the dry run too: its CPU estimate measures these threads
        torch.set_num_threads(to_run[0].run.threads)
    if to_run[0].run.dry_run:
        job.dry_run = True
        if is_rank0():
            print(plan_table(to_run, world_size_from_env()))
            print(stage_estimates(to_run, world_size_from_env(), device))
        return

    preemption.install_handlers()
    if device.type == "cuda":
        set_nccl_environment()
    pd = init_parallel(to_run[0].parallel, device)
    if pd.is_rank0:
        clear_stage_folders(to_run)
    barrier()
    stopped = None  # how the run ended, if not passed; a run that trained gets its report first
    try:
        with collective_timeouts(pd):
            records = run_curriculum(stages, pd, chosen)
    except ConfigError as e:  # found only once a stage reads its data (a file it cannot use)
        raise Stop("config error", str(e), 2) from None
    except GateFailed as e:
        stopped = Stop("stage error", str(e), 1, status="gate failed")
    except StageError as e:  # a stage could not start
        raise Stop("stage error", str(e), 1) from None
    except Diverged as e:
        stopped = Stop("diverged", str(e), 1)
    except preemption.Preempted as e:
        stopped = preempted(e)
    except CollectiveTimeout as e:
        stopped = Stop("parallel error", str(e), 1)
    # The report is most useful after a failed gate. Other ranks may exit first; torchrun then
    # sends rank 0 SIGTERM, which preemption records, and kills it only 30 s later.
    if pd.is_rank0:
        report_at_end(to_run[0])
    if stopped is not None:
        raise stopped
    if pd.is_rank0:
        print(summary_table(records))
