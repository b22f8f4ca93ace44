"""The gated curriculum: stages in order, each entered from the gated checkpoint of the one before.

A stage is trained, then gated: the single needle's recall over the depth grid at the
stage's length must reach ``gate.min_recall`` with no depth cell below
``gate.min_cell_recall``, every task in ``gate.tasks`` its own threshold, and short-context
validation loss must stay within ``gate.max_short_loss_increase`` of the stage before's
(``gate.report_tasks`` are evaluated alongside, before and after, and only recorded). On
failure the stage trains on in increments (up to ``gate.max_extra_steps``), re-evaluating;
then it passes or the run stops non-zero. The decision goes to ``gate.json`` in the stage's
folder, which is also what lets the next stage start, in this process or a later one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from hydra import compose

from longtrain import checkpoint as ckpt
from longtrain import preemption
from longtrain.config import Config, ConfigError, gate_tasks
from longtrain.data.packing import packed_dataset
from longtrain.data.retrieval import Haystack
from longtrain.eval import position_loss
from longtrain.eval.grid import NeedleGrid, recall_text
from longtrain.eval.needle import write_results
from longtrain.eval.suite import run_suite
from longtrain.export import EXPORT_DIR, export_model
from longtrain.parallel.mesh import ParallelDims
from longtrain.logging import MetricsLogger
from longtrain.model.load import ScoreFn
from longtrain.optim.loss import TokenScores
from longtrain.preflight import check_gate_tasks_fit
from longtrain.run_files import GATE_FILE, GateRecord, read_gate, short_loss_limit, write_gate
from longtrain.run_config import load_config
from longtrain.trainer.builder import prepare_trainer
from longtrain.trainer.evaluator import Evaluator
from longtrain.trainer.meter import duration
from longtrain.trainer.trainer import Trainer

# A gate evaluation at 8K tokens takes minutes: say how far it is this often.
PROGRESS_EVERY_S = 30.0


class StageError(RuntimeError):
    """A stage cannot start or did not pass its gate; the message says why, in one line."""


class GateFailed(StageError):
    """A stage trained and was gated, and did not pass (its gate.json says by how much)."""


def stage_dir(cfg: Config) -> Path:
    return Path(cfg.run.dir) / cfg.stage.name


def gate_failures(grids: dict[str, NeedleGrid], short_loss: float, reference: Optional[float], cfg: Config) -> list[str]:
    """Why a gate fails, one phrase per unmet threshold (empty: it passes)."""
    failures = []
    for task, threshold in gate_tasks(cfg).items():
        if threshold is None:
            continue
        grid = grids[task]
        recall = grid.recall_at(grid.lengths[0])
        if recall < threshold:
            failures.append(f"{'' if task == cfg.gate.kind else task + ' '}recall {recall_text(recall, threshold)} (need ≥ {threshold})")
    row = grids[cfg.gate.kind].recall[0]  # the single needle's cells
    worst = int(np.argmin(row))
    if row[worst] < cfg.gate.min_cell_recall:
        depth = grids[cfg.gate.kind].depths[worst]
        failures.append(f"recall {row[worst]:.2f} at depth {depth:.0%} (need ≥ {cfg.gate.min_cell_recall} in every cell)")
    if reference is not None and short_loss > short_loss_limit(reference, cfg.gate.max_short_loss_increase):
        failures.append(f"short loss {short_loss:.4f} (need ≤ {short_loss_limit(reference, cfg.gate.max_short_loss_increase):.4f})")
    return failures


def starting_point(cfg: Config, previous: Optional[Config]) -> tuple[Optional[Path], bool, Optional[GateRecord]]:
    """(weights to start from, whether entry is forced, the previous stage's gate record).

    Refuses, unless ``gate.force``, when the stage before has not passed its gate.
    """
    if previous is None:
        return (Path(cfg.stage.init_from) if cfg.stage.init_from else None), False, None
    before = read_gate(stage_dir(previous))
    if cfg.stage.init_from:
        return Path(cfg.stage.init_from), False, before
    if before is not None and before.passed:
        return Path(before.checkpoint), False, before
    latest = ckpt.latest_checkpoint(stage_dir(previous) / "checkpoints")
    if not cfg.gate.force or latest is None:
        if latest is None:
            why = "has no checkpoint"
            hint = "run it first, or start from given weights with stage.init_from=PATH (gate.force needs a checkpoint to enter from)"
        elif before is None:
            why = "has no gate.json"
            hint = "run it first, or set gate.force=true"
        else:
            why = f"failed its gate (recall {before.recall:.2f})"
            hint = "train it further (more stage.steps or gate.max_extra_steps), or set gate.force=true"
        raise StageError(
            f"stage {cfg.stage.name}: the stage before, {previous.stage.name}, {why} in {stage_dir(previous)}; {hint}"
        )
    return latest, True, before


def counting_progress(score: ScoreFn, label: str, total: int, logger: MetricsLogger) -> ScoreFn:
    """``score``, saying how many of ``total`` samples it has been given: a line every
    PROGRESS_EVERY_S seconds and one when the last arrives (not one per sample)."""
    started = last_line = time.perf_counter()
    done = 0

    def score_counted(input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor) -> TokenScores:
        nonlocal done, last_line
        scores = score(input_ids, position_ids, labels)
        done += input_ids.shape[0]
        now = time.perf_counter()
        if done >= total or now - last_line >= PROGRESS_EVERY_S:
            logger.progress(f"[gate] {label}: {done}/{total} samples  {duration(now - started)} elapsed")
            last_line = now
        return scores

    return score_counted


class Gate:
    """Needle recall at the stage length and short-context loss, asked of an evaluator."""

    def __init__(self, evaluator: Evaluator, cfg: Config):
        self.evaluator, self.cfg = evaluator, cfg
        # The prepared validation split serves the needles, the short loss and loss by position.
        self.val_tokens = evaluator.prepared.stream("val")
        self.val_doc_starts = self.val_tokens.doc_starts
        self.haystack = Haystack.of_stream(self.val_tokens.haystack_tokens(), evaluator.tokenizer)
        self.short_val = packed_dataset(self.val_tokens, cfg.rope.original_max_position_embeddings, cfg.data)

    def grids(self, length: int) -> dict[str, NeedleGrid]:
        """Every gate task's recall over the depth grid at ``length``, one task after another
        (a task's samples do not depend on which other tasks run)."""
        cfg = self.cfg
        tasks = gate_tasks(cfg)
        # Gated tasks on gate.trials per depth; reported ones on gate.report_trials if set.
        trials = {True: cfg.gate.trials, False: cfg.gate.report_trials or cfg.gate.trials}
        with self.evaluator.eval_mode():
            grids = {}
            for gated in (True, False):
                for task in [t for t, threshold in tasks.items() if (threshold is not None) == gated]:
                    score = counting_progress(self.evaluator.score_fn(), f"{task} at {length}",
                                                len(cfg.gate.depths) * trials[gated], self.evaluator.logger)
                    grids.update(run_suite(
                        score, self.evaluator.tokenizer, self.haystack, [task], [length], cfg.gate.depths,
                        trials[gated], cfg.run.seed, cfg.stage.micro_batch_size, self.evaluator.dims.device,
                        cfg.retrieval,
                    ))
            return {task: grids[task] for task in tasks}

    def short_loss(self) -> float:
        cfg = self.cfg
        # As many short samples per forward as a training micro-batch holds tokens.
        per_forward = cfg.stage.micro_batch_size * max(1, cfg.stage.seq_len // self.short_val.seq_len)
        self.evaluator.logger.progress(f"[gate] short loss: {cfg.gate.short_val_samples} samples of {self.short_val.seq_len} tokens")
        return self.evaluator.validate(self.short_val, cfg.gate.short_val_samples, per_forward)

    def position_loss(self, length: int) -> position_loss.PositionLoss:
        """Loss by position on validation documents at least ``length`` tokens long."""
        cfg = self.cfg
        self.evaluator.logger.progress(f"[gate] loss by position: up to {cfg.eval.position_windows} windows of {length} tokens")
        with self.evaluator.eval_mode():
            return position_loss.position_loss(
                self.evaluator.score_fn(), self.val_tokens, self.val_doc_starts, length, cfg.eval.position_buckets,
                cfg.eval.position_windows, cfg.stage.micro_batch_size, self.evaluator.dims.device,
            )


def run_gated_stage(cfg: Config, pd: ParallelDims, previous: Optional[Config]) -> GateRecord:
    """Enter (or resume) one stage, train it, gate it, write gate.json; raise if it fails."""
    init_from, forced, before = starting_point(cfg, previous)
    try:
        trainer = prepare_trainer(cfg, pd, init_from, load_optimizer=cfg.stage.load_optimizer)
    except ckpt.CheckpointError as e:
        raise StageError(f"stage {cfg.stage.name}: cannot start from checkpoint {e}") from None
    try:
        return _train_and_gate(trainer, init_from, forced, before)
    finally:
        trainer.logger.close()


def write_grids(grids: dict[str, NeedleGrid], out_dir: Path, extra: dict) -> None:
    """``<task>.json/.png`` per task (the single needle is ``<gate.kind>.json``)."""
    for task, grid in grids.items():
        write_results(grid, out_dir, extra, name=task)


def _train_and_gate(trainer: Trainer, init_from: Optional[Path], forced: bool, before: Optional[GateRecord]) -> GateRecord:
    cfg, pd = trainer.cfg, trainer.dims
    check_gate_tasks_fit(cfg, trainer.evaluator.tokenizer)  # train.py checked already; a library caller has not
    gate = Gate(trainer.evaluator, cfg)
    log = trainer.logger.info
    directory = stage_dir(cfg)
    single, length = cfg.gate.kind, cfg.stage.seq_len
    if cfg.gate.max_extra_steps:
        log(f"stage {cfg.stage.name}: {cfg.stage.steps} steps, and up to {cfg.gate.max_extra_steps} more in increments "
            f"of {cfg.gate.extra_steps_increment} while its gate fails (gate.max_extra_steps)")

    # The starting checkpoint's recall at the new length, so the stage's gain is visible.
    before_file = directory / "recall_before.json"
    recall_before: dict[str, float] = {}
    if before_file.is_file():
        stored = json.loads(before_file.read_text())
        recall_before = stored.get("tasks", {single: stored["recall"]})
    elif init_from is not None and trainer.step == 0:
        grids = gate.grids(length)
        recall_before = {task: grid.recall_at(length) for task, grid in grids.items()}
        if pd.is_rank0:
            write_grids(grids, directory / "needle_before", {"checkpoint": str(init_from)})
            before_file.write_text(json.dumps(
                {"recall": recall_before[single], "tasks": recall_before, "checkpoint": str(init_from)}
            ))
        log(f"recall of the starting checkpoint at {length}: "
            + ", ".join(f"{task} {r:.2f}" for task, r in recall_before.items()))

    result = trainer.fit()
    reference = before.short_loss if before else None
    extra = 0
    while True:
        grids = gate.grids(length)
        short = gate.short_loss()
        failures = gate_failures(grids, short, reference, cfg)
        passed = not failures
        log(f"gate {cfg.stage.name}: "
            + ", ".join(f"{task} {recall_text(grids[task].recall_at(length), t)}" + ("" if t is None else f" (≥ {t})")
                        for task, t in gate_tasks(cfg).items())
            + f", short loss {short:.4f}"
            + (f" (≤ {short_loss_limit(reference, cfg.gate.max_short_loss_increase):.4f})" if reference else "")
            + f" → {'pass' if passed else 'fail'}")
        if passed or extra >= cfg.gate.max_extra_steps:
            break
        stop = preemption.stop_requested(pd)
        if stop:  # the stage's last checkpoint holds everything so far
            raise preemption.Preempted(
                f"{stop} during the gate of stage {cfg.stage.name}: its latest checkpoint is "
                f"{result.checkpoint}; continue with run.resume=auto", stop, result.step
            )
        increment = min(cfg.gate.extra_steps_increment, cfg.gate.max_extra_steps - extra)
        extra += increment
        result = trainer.train_more(trainer.total_steps + increment)

    tasks = {
        task: {"recall": grids[task].recall_at(length), "recall_before": recall_before.get(task),
               "min_recall": threshold, "worst_cell": min(grids[task].recall[0])}
        for task, threshold in gate_tasks(cfg).items()
    }
    record = GateRecord(
        stage=cfg.stage.name, seq_len=length, passed=passed, forced=forced, recall=tasks[single]["recall"],
        recall_before=recall_before.get(single), short_loss=short, reference_short_loss=reference,
        min_recall=cfg.gate.min_recall, max_short_loss_increase=cfg.gate.max_short_loss_increase,
        extra_steps=extra, step=result.step, checkpoint=str(result.checkpoint), rope=asdict(cfg.rope),
        tasks=tasks, min_cell_recall=cfg.gate.min_cell_recall,
    )
    # Whether later tokens gain from the longer context: not a gate criterion, a picture of it.
    by_position = gate.position_loss(length) if cfg.eval.position_buckets else None
    if passed and cfg.export.after_gate:  # before gate.json: a passed gate always has its export
        export_model(trainer.model, cfg, directory / EXPORT_DIR)
        log(f"exported {directory / EXPORT_DIR}")
    if pd.is_rank0:
        write_grids(grids, directory / "needle", {"checkpoint": str(result.checkpoint)})
        if by_position is not None:
            position_loss.write_results(by_position, directory, {"checkpoint": str(result.checkpoint)})
        write_gate(directory, record)
        trainer.logger.log(result.step, gate_metrics(record), prefix="gate")
        trainer.logger.log_images(result.step, gate_images(directory))
    ckpt.barrier()  # a failed gate exits and torchrun kills the other ranks: not before rank 0 wrote its report
    if not passed:
        raise GateFailed(
            f"stage {cfg.stage.name} failed its gate after {extra} extra steps: {', '.join(failures)}; "
            f"see {directory / GATE_FILE}"
        )
    return record


def gate_metrics(record: GateRecord) -> dict[str, float]:
    """A gate record as metrics: the decision, and each task's recall before → after and worst depth cell."""
    metrics = {"recall": record.recall, "short_loss": record.short_loss, "passed": int(record.passed),
               "extra_steps": record.extra_steps, "forced": int(record.forced)}
    if record.recall_before is not None:
        metrics["recall_before"] = record.recall_before
    if record.reference_short_loss is not None:
        metrics["short_loss_limit"] = short_loss_limit(record.reference_short_loss, record.max_short_loss_increase)
    for task, result in record.tasks.items():
        metrics[f"{task}/recall"] = result["recall"]
        metrics[f"{task}/worst_cell"] = result["worst_cell"]
        if result["recall_before"] is not None:
            metrics[f"{task}/recall_before"] = result["recall_before"]
    return metrics


def gate_images(directory: Path) -> dict[str, Path]:
    """The gate's pictures in a stage folder: needle heatmaps after (and before) training, per
    grid file, and loss by position."""
    images = {f"gate/{sub}/{png.stem}": png for sub in ("needle", "needle_before") for png in sorted((directory / sub).glob("*.png"))}
    if (directory / "position_loss.png").is_file():
        images["gate/position_loss"] = directory / "position_loss.png"
    return images


def summary_table(records: list[GateRecord]) -> str:
    """One row per stage: the single needle's recall at its length before and after training,
    the short loss, every other task's before → after, the gate."""
    others = list(dict.fromkeys(t for r in records for t in list(r.tasks)[1:]))  # the single needle comes first
    head = (f"{'stage':<12} {'length':>7} {'recall before':>14} {'recall after':>13} {'short loss':>11}"
            + "".join(f" {t:>14}" for t in others) + "  gate")
    rows = [head, "-" * len(head)]
    for r in records:
        before = "-" if r.recall_before is None else f"{r.recall_before:.2f}"
        cells = "".join(f" {_before_after(r.tasks.get(t)):>14}" for t in others)
        verdict = ("pass" if r.passed else "fail") + (" (forced entry)" if r.forced else "")
        rows.append(f"{r.stage:<12} {r.seq_len:>7} {before:>14} {r.recall:>13.2f} {r.short_loss:>11.4f}{cells}  {verdict}")
    return "\n".join(rows)


def _before_after(result: Optional[dict]) -> str:
    if result is None:
        return "-"
    before = "-" if result["recall_before"] is None else f"{result['recall_before']:.2f}"
    return f"{before} → {result['recall']:.2f}"


def compose_stage_configs(overrides: list[str], only: Optional[str] = None, names: Optional[list[str]] = None) -> list[Config]:
    """One config per stage a command reads, each with the user's overrides: every stage
    of the curriculum, or stage ``only`` after the stage before it (whose folder it starts
    from). Validated are the stages that will run; the one before is only read from.

    ``names`` is the curriculum's stage list when the caller has composed the command's
    config already (train.py); otherwise it is composed here. Called inside Hydra's app (or
    an ``initialize_config_dir`` block), so every error surfaces before any compute.
    """
    overrides = [o for o in overrides if not o.lstrip("+~").startswith("stage=")]
    if names is None:
        # The stage list only: the stage-less config is not a runnable one (its stage block
        # holds defaults that a stage file replaces), so it is not validated.
        names = compose(config_name="config", overrides=overrides).curriculum.stages
    if not names:
        raise ConfigError("curriculum.stages: needs at least one stage")
    if only is not None:
        if only not in names:
            raise ConfigError(f"stage: {only!r} is not in curriculum.stages; valid: {', '.join(names)}")
        at = list(names).index(only)
        names = names[max(at - 1, 0) : at + 1]
    return [
        load_config(compose(config_name="config", overrides=[f"stage={s}", *overrides]), check=only in (None, s))
        for s in names
    ]


def stages_to_run(stages: list[Config], chosen: Optional[str]) -> list[Config]:
    """The stages a command runs, of those :func:`compose_stage_configs` gave: all, or the
    one ``stage=`` chose (the last)."""
    return stages if chosen is None else stages[-1:]


def run_curriculum(stage_configs: list[Config], pd: ParallelDims, chosen: Optional[str] = None) -> list[GateRecord]:
    """Run the stages in order, skipping those whose gate already passed; or, when a command
    chose one stage, that stage (the last config, started from the one before it), passed or not."""
    if chosen is not None:
        *before, cfg = stage_configs
        return [run_gated_stage(cfg, pd, before[-1] if before else None)]
    records = []
    for i, cfg in enumerate(stage_configs):
        done = read_gate(stage_dir(cfg))
        if done is not None and done.passed:
            records.append(done)
            continue
        records.append(run_gated_stage(cfg, pd, stage_configs[i - 1] if i else None))
    return records
