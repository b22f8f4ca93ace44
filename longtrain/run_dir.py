"""A run folder belongs to one run.

``run.dir/run.json`` holds the run's identity (its id names the wandb runs and is
recorded in every checkpoint, so retention only ever prunes this run's checkpoints). A
stage folder that already holds an earlier run's state (checkpoints, metrics, a gate
record) is never started over silently: the run continues it (``run.resume``), deletes it
on request (``run.overwrite=true``), or refuses in one line before anything is written.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

from longtrain.config import Config, ConfigError
from longtrain.run_files import GATE_FILE, RunRecord, read_run_record, write_run_record

METRICS_FILE = "metrics.jsonl"
_STATE_FILES = (METRICS_FILE, GATE_FILE, "recall_before.json")


def stage_state(stage_dir: Path) -> list[str]:
    """What an earlier run left in a stage folder, in words (empty: nothing)."""
    found = []
    ckpts = sorted(p.name for p in (stage_dir / "checkpoints").glob("step_*")) if stage_dir.is_dir() else []
    if ckpts:
        found.append(f"checkpoints up to {ckpts[-1]}")
    found += [name for name in _STATE_FILES if (stage_dir / name).is_file()]
    return found


def check_stage_folders(stages: list[Config]) -> None:
    """Refuse a fresh start in stage folders that hold an earlier run's state (one line)."""
    for cfg in stages:
        if cfg.run.resume != "none" or cfg.run.overwrite:
            continue
        directory = Path(cfg.run.dir) / cfg.stage.name
        found = stage_state(directory)
        if found:
            raise ConfigError(
                f"run.dir: {directory} holds an earlier run ({', '.join(found)}); continue it with "
                "run.resume=auto, delete it with run.overwrite=true, or choose another run.dir"
            )


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl (longtrain/logging.py), without a line cut short by a kill."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def clear_stage_folders(stages: list[Config]) -> None:
    """``run.overwrite=true``: delete the earlier state of the stages about to run (rank 0)."""
    for cfg in stages:
        directory = Path(cfg.run.dir) / cfg.stage.name
        if cfg.run.overwrite and directory.is_dir():
            shutil.rmtree(directory)


def run_id(run_dir: Path) -> str:
    """The id in ``run.dir/run.json``, written there first if the folder has none (rank 0)."""
    record = read_run_record(run_dir)
    if record is None:
        record = RunRecord(f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        write_run_record(run_dir, record)
    return record.id


def truncate_metrics(stage_dir: Path, step: int) -> None:
    """On resume, drop the metrics logged after the checkpoint: those steps run again."""
    path = stage_dir / METRICS_FILE
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a line cut short by a kill mid-write
        return float("inf")
