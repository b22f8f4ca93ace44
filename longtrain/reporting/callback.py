"""The Hydra callback of ``train.py -m`` (registered in configs/config.yaml): when the
multirun ends, the sweep's table and page, and the sweep's exit code."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from longtrain.command_line import sweep_root
from longtrain.reporting.sweep_report import write_report, write_sweep_report


class ReportCallback(Callback):
    """On rank 0: the sweep's table (and page, with ``logging.report``), then exit with the
    worst job's code when a job failed.

    Jobs return normally (so that every job runs and a sweeper sees each value), and with
    submitit they run in other processes, so their job.json files are what says how each
    ended. Hydra hands train.py nothing back from a multirun, so the exit happens here.
    """

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        if os.environ.get("RANK", "0") != "0":
            return
        folder = Path(sweep_root(list(config.hydra.overrides.task), config.hydra.sweep.dir))
        report = write_report(folder) if folder.is_dir() else None
        if report is None:
            return
        if config.logging.report:  # the same as a page, jobs' reports linked
            print(f"report: {write_sweep_report(report).html}", flush=True)
        failed = report.failed()
        if failed:
            submitit = "submitit" in str(config.hydra.launcher.get("_target_", ""))  # jobs ran in processes of their own
            errors_at = f"in {Path(config.hydra.sweep.dir) / '.submitit'}/*/*_log.err" if submitit else "above"
            jobs = ", ".join(str(r.record.job) for r in failed)
            print(f"sweep: job(s) {jobs} failed (their errors are {errors_at})", file=sys.stderr)
            sys.exit(max(r.record.code for r in failed))
