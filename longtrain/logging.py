"""Metrics to the console, a JSONL file per stage, and optionally wandb. Rank 0 only.

wandb: one wandb run per curriculum stage, grouped by the run's id, with files under
``run.dir/wandb``. Its id is derived from the run id and the stage, so a resumed stage
appends to the same wandb run. Every record carries ``step`` as its x-axis (not wandb's own
step counter), so the steps a resume repeats do not collide with those already logged.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Optional

from longtrain.config import LoggingConfig


class MetricsLogger:
    def __init__(
        self,
        path: Path,
        cfg: LoggingConfig,
        enabled: bool,
        run_config: dict[str, Any],
        run_id: str,
        stage: str,
        wandb_dir: Path,
    ):
        self.enabled = enabled
        self.path = path
        self.cfg = cfg
        self._wandb: Optional[Any] = None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if cfg.wandb:
            self._wandb = init_wandb(cfg, run_id, stage, wandb_dir, run_config)

    def log(self, step: int, metrics: dict[str, float], prefix: str = "train", progress: str = "") -> None:
        """One record in metrics.jsonl (and wandb); on the terminal, ``progress`` (step of
        total, elapsed, ETA) in place of the bare step when given."""
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **{f"{prefix}/{k}": v for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(record)
        if self.cfg.progress:
            shown = "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
            print(f"[{prefix}] {progress or f'step {step:6d}'}  {shown}", flush=True)

    def log_images(self, step: int, images: dict[str, Path]) -> None:
        """Pictures for wandb (the files themselves are already in the stage folder)."""
        if self._wandb is not None:
            import wandb

            self._wandb.log({"step": step, **{k: wandb.Image(str(p)) for k, p in images.items()}})

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def progress(self, message: str) -> None:
        """A line for a person watching (``logging.progress``); never in metrics.jsonl."""
        if self.enabled and self.cfg.progress:
            print(message, flush=True)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def init_wandb(cfg: LoggingConfig, run_id: str, job: str, wandb_dir: Path, run_config: dict[str, Any]) -> Any:
    """The wandb run of one job of the run (a stage, or the report), in the run's group."""
    import wandb  # imported lazily: most runs do not use it

    wandb_dir.mkdir(parents=True, exist_ok=True)
    # WANDB_MODE=offline keeps it local; wandb reads it from the environment.
    run = wandb.init(
        project=cfg.wandb_project,
        id=re.sub(r"[^A-Za-z0-9_-]", "-", f"{run_id}-{job}"),
        name=f"{run_id}/{job}",
        group=run_id,
        job_type=job,
        resume="allow",
        dir=str(wandb_dir),
        config=run_config,
    )
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


def log_report(cfg: LoggingConfig, run_id: str, wandb_dir: Path, run_config: dict[str, Any],
               images: dict[str, Path], tables: dict[str, tuple[list[str], list[list[str]]]]) -> None:
    """The run report's figures and tables, in a wandb run ``<run id>-report`` of the run's group."""
    import wandb

    run = init_wandb(cfg, run_id, "report", wandb_dir, run_config)
    try:
        run.log({"step": 0, **{f"report/{k}": wandb.Image(str(p)) for k, p in images.items()},
                 **{f"report/{k}": wandb.Table(columns=h, data=rows) for k, (h, rows) in tables.items()}})
    finally:
        run.finish()


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
