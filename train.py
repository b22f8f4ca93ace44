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

# Everything runs offline: datasets/transformers must never try the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Hydra raises its errors to us instead of printing them over several lines.
os.environ["HYDRA_FULL_ERROR"] = "1"

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from longtrain.cli import hydra_error_line, plan_table, preflight  # noqa: E402
from longtrain.config import ConfigError, validate  # noqa: E402
from longtrain.hardware import check_device  # noqa: E402
from longtrain.parallel.mesh import init_parallel, resolve_device, world_size_from_env  # noqa: E402


class JobFailed(Exception):
    """One multirun job failed; Hydra records it and goes on with the next."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


failed_jobs: list[tuple[int, int]] = []  # (job number, exit code) of this sweep


def is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def fail(kind: str, message: str, code: int, job: int | None = None) -> None:
    if is_rank0():  # every rank fails the same way; one line is enough
        print(f"{kind}: {message}", file=sys.stderr, flush=True)
    if job is not None:
        failed_jobs.append((job, code))
        raise JobFailed(code)
    sys.exit(code)


def job_overrides(hydra_cfg: DictConfig) -> tuple[list[str], int | None]:
    """The command line's overrides and, in a multirun, the job's number; a multirun job's
    run.dir is its own folder: the sweep's (multirun/<date>/<job>) or run.dir/<job>."""
    overrides = list(hydra_cfg.overrides.task)
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return overrides, None
    job = int(hydra_cfg.job.num)
    given = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("run.dir=")]
    if not given and world_size_from_env() > 1:  # each rank would date the sweep folder by its own clock
        raise ConfigError("run.dir: a multirun under torchrun needs run.dir=FOLDER (jobs go to FOLDER/<job>)")
    run_dir = os.path.join(given[-1], str(job)) if given else hydra_cfg.runtime.output_dir
    return [*(o for o in overrides if not o.lstrip("+").startswith("run.dir=")), f"run.dir={run_dir}"], job


@hydra.main(config_path="configs", config_name="config", version_base=None)
def main(raw: DictConfig) -> None:
    from longtrain import preemption
    from longtrain.curriculum import StageError, compose_stage_configs, run_curriculum, summary_table
    from longtrain.trainer import Diverged

    hydra_cfg = HydraConfig.get()
    chosen = hydra_cfg.runtime.choices.get("stage")
    try:
        overrides, job = job_overrides(hydra_cfg)
    except ConfigError as e:
        return fail("config error", str(e), 2, int(hydra_cfg.job.num))
    if job is not None and is_rank0():
        print(f"=== job {job}: {' '.join(overrides)}", flush=True)
    try:
        stages = compose_stage_configs(overrides, only=chosen)
        names = stages[0].curriculum.stages
        if chosen is not None and chosen not in names:
            raise ConfigError(f"stage: {chosen!r} is not in curriculum.stages; valid: {', '.join(names)}")
        to_run = [stages[names.index(chosen)]] if chosen is not None else stages
        for cfg in to_run:
            validate(cfg, world_size=world_size_from_env())
        preflight(to_run)
        device = resolve_device(stages[0].run.device)
        for cfg in to_run:  # the attention kernel this device runs, and what it needs
            check_device(cfg, device)
    except ConfigError as e:
        return fail("config error", str(e), 2, job)
    if stages[0].run.dry_run:
        if is_rank0():
            print(plan_table(to_run, world_size_from_env()))
        return

    import torch  # after validation: a bad config should not pay for importing torch's world

    from longtrain.checkpoint import barrier
    from longtrain.parallel.mesh import CollectiveTimeout, collective_timeouts
    from longtrain.run_dir import clear_stage_folders

    if stages[0].run.threads:
        torch.set_num_threads(stages[0].run.threads)
    preemption.install_handlers()
    pd = init_parallel(stages[0].parallel, device)
    if pd.is_rank0:
        clear_stage_folders(to_run)
    barrier()
    try:
        with collective_timeouts(pd):
            records = run_curriculum(stages, pd, only=names.index(chosen) if chosen is not None else None)
    except ConfigError as e:  # found only once a stage reads its data (a file it cannot use)
        return fail("config error", str(e), 2, job)
    except StageError as e:
        return fail("stage error", str(e), 1, job)
    except Diverged as e:
        return fail("diverged", str(e), 1, job)
    except preemption.Preempted as e:
        return fail("preempted", str(e), preemption.PREEMPTED_EXIT_CODE, job)
    except CollectiveTimeout as e:
        return fail("parallel error", str(e), 1, job)
    if pd.is_rank0:
        print(summary_table(records))


if __name__ == "__main__":
    try:
        main()
    except JobFailed:  # the sweep ran every job; Hydra re-raises the first failure at its end
        jobs = ", ".join(str(n) for n, _ in failed_jobs)
        if is_rank0():
            print(f"sweep: job(s) {jobs} failed (their errors are above)", file=sys.stderr)
        sys.exit(max(code for _, code in failed_jobs))
    except Exception as e:  # Hydra's own errors: an unknown key or option, a parse error
        line = hydra_error_line(e)
        if line is None:
            raise
        if is_rank0():
            print(f"config error: {line}", file=sys.stderr)
        sys.exit(2)
