"""Metrics to the console, a JSONL file per stage, and optionally wandb. Rank 0 only."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from longtrain.config import LoggingConfig


class MetricsLogger:
    def __init__(self, path: Path, cfg: LoggingConfig, enabled: bool, run_config: dict[str, Any], run_name: str):
        self.enabled = enabled
        self.path = path
        self.cfg = cfg
        self._wandb: Optional[Any] = None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if cfg.wandb:
            import wandb  # imported lazily: most runs do not use it

            # WANDB_MODE=offline keeps it local; wandb reads it from the environment.
            self._wandb = wandb.init(project=cfg.wandb_project, name=run_name, config=run_config)

    def log(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **{f"{prefix}/{k}": v for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(record, step=step)
        if self.cfg.progress:
            shown = "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
            print(f"[{prefix}] step {step:6d}  {shown}", flush=True)

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
