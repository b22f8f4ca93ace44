"""Re-gate a finished curriculum run with today's gate: every stage's starting weights
(the gated checkpoint of the stage before) and its gated weights, through the gate's own
code (Gate.grids: each task of gate.kind, gate.tasks and gate.report_tasks over
gate.depths × gate.trials at the stage length, the stage's RoPE), no training.

Prints per stage and task the recall before → after and the worst depth cell, and the
seconds each grid took next to a 4-trial grid of the single needle (the gate's old size)
timed in the same run: the ratio is what the larger grid costs.

    python -m bench.regate RUN_DIR preset=cpu_demo rope=yarn gate.trials=10   # the run's overrides, and any gate
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from hydra import initialize_config_dir

from longtrain.config import gate_tasks
from longtrain.curriculum import Gate, compose_stage_configs
from longtrain.parallel.mesh import ParallelDims
from longtrain.run_files import read_gate
from longtrain.trainer.builder import build_trainer

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


def timed_grids(gate: Gate, length: int) -> tuple[dict, float]:
    start = time.perf_counter()
    grids = gate.grids(length)
    return grids, time.perf_counter() - start


def main(run_dir: Path, overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        stages = compose_stage_configs([*overrides, f"run.dir={run_dir}"])
    pd = ParallelDims(dp=1, cp=1, rank=0, world_size=1, device=torch.device("cpu"))
    previous = None
    for cfg in stages:
        record = read_gate(run_dir / cfg.stage.name)
        if record is None:
            print(f"{cfg.stage.name}: no gate.json in {run_dir}, stopping")
            break
        # A scratch folder for the trainer's metrics file: nothing is written into the run.
        scratch = replace(cfg, run=replace(cfg.run, dir=tempfile.mkdtemp(prefix="regate-")))
        trainer = build_trainer(scratch, pd)
        gate, length = Gate(trainer.evaluator, scratch), cfg.stage.seq_len
        before = {}
        if previous is not None:
            trainer.checkpointer.load_weights(Path(previous["checkpoint"]))
            before, _ = timed_grids(gate, length)
        trainer.checkpointer.load_weights(Path(record.checkpoint))
        after, seconds = timed_grids(gate, length)
        old = replace(scratch, gate=replace(scratch.gate, trials=4, tasks={}, report_tasks=[]))
        _, old_seconds = timed_grids(Gate(trainer.evaluator, old), length)
        print(f"{cfg.stage.name} ({length} tokens, {len(cfg.gate.depths)}×{cfg.gate.trials} per task, trained "
              f"{record.step} steps, gated then at {record.recall:.2f}): all tasks {seconds:.0f} s, "
              f"the old grid ({len(cfg.gate.depths)}×4, single needle) {old_seconds:.0f} s (ratio {seconds / old_seconds:.1f})")
        for task, threshold in gate_tasks(cfg).items():
            b = f"{before[task].recall_at(length):.2f}" if before else "-"
            a = after[task]
            print(f"  {task:<10} {b} → {a.recall_at(length):.2f}  worst cell {min(a.recall[0]):.2f}"
                  + ("  (reported)" if threshold is None else f"  (gate ≥ {threshold})"))
        sys.stdout.flush()
        previous = record


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
