"""The train.py command: ``main(argv) -> exit code``, and what it needs around Hydra:
one-line errors, per-job run folders, checks before any compute.

``main`` composes the config with Hydra, runs the whole curriculum or the one stage named
by ``stage=...`` (one job per setting with ``-m``), reports every bad input as one line
(before any compute, nothing written) and maps the outcome to an exit code: 0 done; 1 a
stage failed its gate, diverged or a rank hung; 2 bad input; 75 stopped by SIGTERM/SIGUSR1
after saving a checkpoint (requeue with run.resume=auto). With -m (multirun) each job gets
its own run folder, and a failing job does not stop the jobs after it; the sweep exits
with the worst job's code. Tests call ``main([...])`` in-process; train.py is its entry.

Hydra reports its own errors (an unknown key, a missing group option, a sweep value
without ``-m``) as several lines of text with exit code 1; :func:`hydra_error_line` turns
them into the project's one line (``config error: KEY: what is wrong; valid: ...``, exit
2). :func:`preflight` runs every check that needs the file system — stage folders owned
by an earlier run, a ``run.resume`` checkpoint, the tokenizer and its vocabulary — before
the process group starts or anything is written.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from longtrain.config import Config, ConfigError, validate
from longtrain.hardware import check_device
from longtrain.parallel.mesh import init_parallel, resolve_device, world_size_from_env
from longtrain.sweep_report import ReportCallback

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

# Hydra plugins (and the packages they import) that the optional extra "sweep" installs.
SWEEP_EXTRA_OPTIONS = {"hydra/sweeper": ("optuna",), "hydra/launcher": ("submitit_local", "submitit_slurm")}
SWEEP_EXTRA_MODULES = ("optuna", "submitit")
SWEEP_EXTRA_HINT = 'needs the optional extra "sweep": pip install -e ".[sweep]"'


def group_options(group: str) -> list[str]:
    """Every option of a config group, nested ones included (``cpu/pretrain``)."""
    root = CONFIG_DIR / group
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def hydra_error_line(error: Exception) -> Optional[str]:
    """Hydra's multi-line composition and parse errors as one ``KEY: message`` line."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    text = str(error)
    missing = _missing_module(error)
    if missing in SWEEP_EXTRA_MODULES:
        return f"{missing}: not installed; the sweeper or launcher chosen {SWEEP_EXTRA_HINT}"
    if isinstance(error, MissingConfigException) and error.missing_cfg_file:
        group, _, option = error.missing_cfg_file.rpartition("/")
        if option in SWEEP_EXTRA_OPTIONS.get(group, ()):
            return f"{group}: {option} {SWEEP_EXTRA_HINT}"
        valid = group_options(group) if (CONFIG_DIR / group).is_dir() else list(error.options or [])
        return f"{group}: unknown option {option!r}; valid: {', '.join(valid)}"
    if isinstance(error, OverrideParseException):
        return f"{error.override}: not a valid override (KEY=VALUE, e.g. optim.lr=1e-3): {text.splitlines()[-2].strip()}"
    if isinstance(error, ConfigCompositionException):
        if m := re.match(r"Could not override '([^']+)'", text):
            return _unknown_key(m.group(1))
        if m := re.match(r"Ambiguous value for argument '([^=]+)=([^']*)'", text):
            return (f"{m.group(1)}: {m.group(2)!r} is a sweep (several values); add -m to run one job per value, "
                    f"or write a list as [{m.group(2)}]")
        if m := re.match(r"Could not append to config. An item is already at '([^']+)'", text):
            return f"{m.group(1)}: already set; override it without the leading +"
        return f"config: {text.splitlines()[0]}"
    return None


def _missing_module(error: BaseException) -> Optional[str]:
    """The top-level package a ModuleNotFoundError names, also when Hydra wrapped it."""
    seen: Optional[BaseException] = error
    while seen is not None:
        if isinstance(seen, ModuleNotFoundError) and seen.name:
            return seen.name.split(".")[0]
        seen = seen.__cause__ or seen.__context__
    return None


def torchrun_env_from_submitit() -> None:
    """A sweep job that hydra/launcher=slurm started runs one task per GPU on each node;
    give every task the variables torchrun would (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT), so the job is one torch distributed world like a torchrun job."""
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "RANK" not in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        # Every task keeps every GPU in sight and takes cuda:LOCAL_RANK, as under torchrun.
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def _unknown_key(key: str) -> str:
    parent, _, name = key.rpartition(".")
    node: object = Config
    for part in parent.split(".") if parent else []:
        fields = getattr(node, "__dataclass_fields__", {})
        if part not in fields:
            return f"{key}: unknown key; valid top-level keys: {', '.join(Config.__dataclass_fields__)}"
        node = fields[part].default_factory()  # type: ignore[misc]
    if isinstance(node, dict):  # a mapping (gate.tasks): Hydra adds new entries only with +
        return f"{key}: not in {parent}; add it with +{key}=VALUE"
    valid = ", ".join(getattr(node, "__dataclass_fields__", {}))
    return f"{key}: unknown key; valid: {valid}"


def preflight(stages: list[Config]) -> None:
    """Checks that read files, for the stages this command runs; raise ConfigError."""
    from longtrain import checkpoint as ckpt
    from longtrain.curriculum import check_gate_tasks_fit
    from longtrain.data.tokenizer import build_tokenizer
    from longtrain.run_dir import check_stage_folders

    check_stage_folders(stages)
    resume = stages[0].run.resume
    if resume not in ("none", "auto"):
        if not ckpt.is_complete(Path(resume)):
            raise ConfigError(
                f"run.resume: {resume} is not a complete checkpoint (a step_XXXXXXXX folder with "
                f"{ckpt.CHECKSUMS}); valid: none, auto, or such a folder"
            )
        problem = ckpt.verify_checkpoint(Path(resume))
        if problem is not None:
            raise ConfigError(f"run.resume: checkpoint {resume} is damaged: {problem}; use run.resume=auto to take the newest valid one")
    try:
        tokenizer = build_tokenizer(stages[0].tokenizer)
    except Exception as e:  # transformers raises many kinds for a folder that is not a tokenizer
        raise ConfigError(
            f"tokenizer.path: {stages[0].tokenizer.path} is not a Hugging Face tokenizer folder "
            f"({type(e).__name__}); give a folder saved with save_pretrained (tokenizer.json / tokenizer_config.json)"
        ) from None
    for cfg in stages:
        if cfg.model.vocab_size is not None and cfg.model.vocab_size < tokenizer.vocab_size:
            raise ConfigError(
                f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} ids; "
                f"use >= {tokenizer.vocab_size} or null (the tokenizer's)"
            )
        check_gate_tasks_fit(cfg, tokenizer)


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


def sweep_root(task_overrides: list[str], sweep_dir: str) -> str:
    """The folder holding a multirun's job folders: the ``run.dir`` given on the command
    line (jobs go to run.dir/<job>), else Hydra's sweep folder (multirun/<date>/<job>)."""
    given = [o.split("=", 1)[1] for o in task_overrides if o.lstrip("+").startswith("run.dir=")]
    return given[-1] if given else sweep_dir


def main(argv: Sequence[str], prog: str = "train.py") -> int:
    """``python PROG ARGV``: compose with Hydra, run, and return the exit code (the
    failure's one line already on stderr). Tests call it in-process. ``prog`` is the
    script as the user typed it; Hydra shows it in its messages (--info, completion)."""
    # Hydra raises its errors to us instead of printing them over several lines.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    ReportCallback.last = None  # a sweep before this call, in the same process, is not this one's
    saved_argv, sys.argv = sys.argv, [prog, *argv]  # Hydra parses sys.argv
    try:
        hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)(run_job)()
    except SystemExit as e:  # a single run's failure, or Hydra's own exit (--help)
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
    swept = ReportCallback.last  # a multirun: every job ran; the worst one decides the exit code
    if swept is not None and swept.failed():
        if is_rank0():
            jobs = ", ".join(str(r.record.job) for r in swept.failed())
            print(f"sweep: job(s) {jobs} failed (their errors are {ReportCallback.errors_at})", file=sys.stderr)
        return max(r.record.code for r in swept.failed())
    return 0


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
    from longtrain.sweep_job import JobRecord, job_objective, write_job_record

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
    from longtrain import preemption
    from longtrain.curriculum import GateFailed, StageError, compose_stage_configs, run_curriculum, stages_to_run, summary_table
    from longtrain.trainer import Diverged

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
        for cfg in to_run:
            validate(cfg, world_size=world_size_from_env())
        preflight(to_run)
        device = resolve_device(stages[0].run.device)
        for cfg in to_run:  # the attention kernel this device runs, and what it needs
            check_device(cfg, device)
    except ConfigError as e:
        raise Stop("config error", str(e), 2) from None
    if stages[0].run.dry_run:
        job.dry_run = True
        if is_rank0():
            print(plan_table(to_run, world_size_from_env()))
        return

    import torch  # after validation: a bad config should not pay for importing torch's world

    from longtrain.checkpoint import barrier
    from longtrain.parallel.mesh import CollectiveTimeout, collective_timeouts
    from longtrain.report import report_at_end
    from longtrain.run_dir import clear_stage_folders

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
