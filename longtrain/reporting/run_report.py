"""The run report: one page that says how a curriculum run went, stage by stage.

    python -m longtrain.reporting RUN_DIR [--out DIR]      # a run folder, finished or not

It reads what the stages left (``STAGE/config.yaml``, ``metrics.jsonl``,
``gate.json``, ``needle*/``, ``position_loss.json``) and writes ``report.html`` (one
self-contained file: inline CSS, figures as PNG data URIs, no script) and ``report.md``
(the same tables, the figures linked from ``report/``). train.py writes it when a run
ends, passed or not (``logging.report``). A stage that never wrote its gate record (a run
stopped mid-stage) is shown with what it has.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from omegaconf import OmegaConf

from longtrain.config import Config, RopeConfig
from longtrain.eval.grid import NeedleGrid, draw_heatmap, pyplot, recall_text
from longtrain.logging import log_report
from longtrain.reporting.tables import Table, Written, number_cell, short_loss_cell, write_page
from longtrain.run_dir import METRICS_FILE, read_metrics, run_id
from longtrain.run_files import GATE_FILE, RUN_FILE, GateRecord, RunRecord, read_gate, read_run_record

R = TypeVar("R")

FIGURES_DIR = "report"  # the figures' PNG files, next to report.md
NEEDLE_FILE = "needle.json"  # the gate's grid in runs before per-task <task>.json files
STAGE_FILES = ("config.yaml", METRICS_FILE, GATE_FILE)  # any of them makes a folder a stage's


class ReportError(ValueError):
    """A folder the report cannot be built from; the message names it and says why."""


def _record(read: Callable[[Path], Optional[R]], folder: Path, name: str) -> Optional[R]:
    """A record of the run folder (longtrain/run_files.py), None when absent."""
    try:
        return read(folder)
    except ValueError as e:
        raise ReportError(f"{folder / name}: not valid JSON ({e})") from None


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from None


# -- reading a run folder ----------------------------------------------------------------


def read_grids(folder: Path) -> dict[str, NeedleGrid]:
    """Needle grids by task: each ``<task>.json``, and ``needle.json`` under its kind unless a
    per-task file already holds that task."""
    grids: dict[str, NeedleGrid] = {}
    paths = sorted(folder.glob("*.json"), key=lambda p: p.name == NEEDLE_FILE)  # needle.json last
    for path in paths:
        r = _json(path)
        try:
            grid = NeedleGrid(r["kind"], r["lengths"], r["depths"], r["trials"], r["recall"])
        except KeyError as e:
            raise ReportError(f"{path}: not a needle grid (no {e})") from None
        grids.setdefault(grid.kind if path.name == NEEDLE_FILE else path.stem, grid)
    return grids


@dataclass
class StageRun:
    """What one stage folder holds; a stage still running or stopped has no gate record."""

    name: str
    folder: Path
    config: dict  # its config.yaml ({}: none written yet)
    gate: Optional[GateRecord]
    metrics: list[dict]
    after: dict[str, NeedleGrid] = field(default_factory=dict)  # the gate's grids, by task
    before: dict[str, NeedleGrid] = field(default_factory=dict)  # the starting checkpoint's
    position: Optional[dict] = None  # position_loss.json

    @classmethod
    def read(cls, folder: Path) -> "StageRun":
        config_file = folder / "config.yaml"
        config = OmegaConf.to_container(OmegaConf.load(config_file)) if config_file.is_file() else {}
        position_file = folder / "position_loss.json"
        return cls(
            name=folder.name, folder=folder, config=config,  # type: ignore[arg-type]
            gate=_record(read_gate, folder, GATE_FILE),
            metrics=read_metrics(folder / METRICS_FILE),
            after=read_grids(folder / "needle"), before=read_grids(folder / "needle_before"),
            position=_json(position_file) if position_file.is_file() else None,
        )

    def _setting(self, group: str, key: str) -> Any:
        return self.config.get(group, {}).get(key)

    @property
    def seq_len(self) -> Optional[int]:
        return self.gate.seq_len if self.gate else self._setting("stage", "seq_len")

    @property
    def step(self) -> int:
        """The step the gate was taken at, or else the last training step logged (extra gate steps included)."""
        if self.gate is not None:
            return self.gate.step
        return max((r["step"] for r in self.metrics if "train/loss" in r), default=0)

    def steps(self) -> str:
        """Steps trained; "of N" while a stage not gated yet is short of its planned steps."""
        planned = self._setting("stage", "steps")
        return f"{self.step} of {planned}" if self.gate is None and planned and self.step < planned else str(self.step)

    @property
    def tokens(self) -> Optional[int]:
        batch = self._setting("stage", "global_batch_size")
        return None if batch is None or self.seq_len is None else self.step * batch * self.seq_len

    @property
    def wall_s(self) -> Optional[float]:
        """From the first to the last metrics line (a resumed stage: its gaps included)."""
        times = [r["time"] for r in self.metrics if "time" in r]
        return max(times) - min(times) if len(times) > 1 else None

    @property
    def tokens_per_s(self) -> Optional[float]:
        """Median training throughput per device, over the logged windows."""
        values = [r["train/tokens_per_s"] for r in self.metrics if "train/tokens_per_s" in r]
        return statistics.median(values) if values else None

    @property
    def rope(self) -> str:
        rope = (self.gate.rope if self.gate else None) or self.config.get("rope")
        return RopeConfig(**rope).label() if rope else "–"

    def recalls(self) -> dict[str, tuple[Optional[float], Optional[float], Optional[float]]]:
        """Per task: (recall before, recall after, the gate's minimum) at the stage length."""
        gate = self.gate
        if gate is not None and gate.tasks:  # none in a gate.json from before per-task results
            return {t: (v.get("recall_before"), v["recall"], v.get("min_recall")) for t, v in gate.tasks.items()}
        kind = self._setting("gate", "kind") or next(iter(self.after or self.before), "passkey")
        if gate is not None:
            return {kind: (gate.recall_before, gate.recall, gate.min_recall)}
        # Not gated: only the starting checkpoint's grids, if it got that far.
        return {t: (g.recall_at(g.lengths[-1]), None, None) for t, g in self.before.items()}

    def verdict(self) -> str:
        gate = self.gate
        if gate is None:
            return f"not gated: no {GATE_FILE} (running, or stopped)"
        return ("pass" if gate.passed else "FAIL") + (", forced entry" if gate.forced else "")


@dataclass
class RunReport:
    folder: Path
    run: Optional[RunRecord]
    stages: list[StageRun]
    not_started: list[str]  # curriculum stages without a folder

    def tasks(self) -> list[str]:
        names: list[str] = []
        for stage in self.stages:
            names += [t for t in stage.recalls() if t not in names]
        return names

    def summary(self) -> str:
        gated = [s for s in self.stages if s.gate is not None]
        passed = [s for s in gated if s.gate.passed]  # type: ignore[union-attr]
        total = len(self.stages) + len(self.not_started)
        text = f"{len(passed)} of {total} stages passed their gate"
        failed = [s.name for s in gated if not s.gate.passed]  # type: ignore[union-attr]
        if failed:
            text += f"; failed: {', '.join(failed)}"
        stopped = [s.name for s in self.stages if s.gate is None]
        if stopped:
            text += f"; stopped before its gate: {', '.join(stopped)}"
        if self.not_started:
            text += f"; not started: {', '.join(self.not_started)}"
        return text + "."


def _curriculum_names(stages: list[StageRun]) -> list[str]:
    """The stage folder names of the curriculum, in order (``cpu/pretrain`` → ``pretrain``)."""
    for stage in stages:
        listed = stage._setting("curriculum", "stages")
        if listed:
            return [Path(s).name for s in listed]
    return []


def is_run_folder(folder: Path) -> bool:
    return (folder / RUN_FILE).is_file() or any(
        (sub / name).is_file() for sub in folder.iterdir() if sub.is_dir() for name in STAGE_FILES)


def read_run(folder: Path) -> RunReport:
    found = [StageRun.read(sub) for sub in sorted(folder.iterdir())
             if sub.is_dir() and any((sub / name).is_file() for name in STAGE_FILES)]
    order = _curriculum_names(found)

    def position(stage: StageRun) -> tuple[int, float]:
        started = min((r["time"] for r in stage.metrics if "time" in r), default=float("inf"))
        return (order.index(stage.name) if stage.name in order else len(order), started)

    stages = sorted(found, key=position)
    run = _record(read_run_record, folder, RUN_FILE)
    names = {s.name for s in stages}
    return RunReport(folder, run, stages, [n for n in order if n not in names])


# -- tables ------------------------------------------------------------------------------


def _tokens(n: Optional[int]) -> str:
    if n is None:
        return "–"
    return next(f"{n / scale:.1f}{unit}" for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K"), (1, "")) if n >= scale or scale == 1)


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "–"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _recall_cell(before: Optional[float], after: Optional[float], minimum: Optional[float]) -> str:
    if minimum is None or after is None:
        return f"{number_cell(before)} → {number_cell(after)}"
    return f"{number_cell(before)} → {recall_text(after, minimum)} (≥ {minimum:g})"


def stage_table(report: RunReport) -> Table:
    tasks = report.tasks()
    header = ["stage", "length", "RoPE", "steps", "tokens", "wall", *[f"{t} recall before → after" for t in tasks],
              "short loss (limit)", "gate", "extra steps"]
    rows = []
    for s in report.stages:
        recalls = s.recalls()
        rows.append(
            [s.name, str(s.seq_len or "–"), s.rope, s.steps(), _tokens(s.tokens), _duration(s.wall_s)]
            + [_recall_cell(*recalls[t]) if t in recalls else "" for t in tasks]
            + [short_loss_cell(s.gate) or "–", s.verdict(), str(s.gate.extra_steps) if s.gate else "–"]
        )
    rows += [[name, *["–"] * (len(header) - 3), "not started", "–"] for name in report.not_started]
    return header, rows


# -- figures -----------------------------------------------------------------------------


def needle_figure(report: RunReport, path: Path) -> Optional[Path]:
    """Every stage's needle grids side by side (per task), rows before / after its training."""
    panels = []
    for task in report.tasks():
        for s in report.stages:
            after, before = s.after.get(task), s.before.get(task)
            shown = [(label, g) for label, g in (("before", before), ("after", after)) if g is not None]
            if shown:
                panels.append((task, s, [(label, g) for label, g in shown if g.depths == shown[-1][1].depths]))
    if not panels:
        return None
    plt = pyplot()
    ncols = min(2, len(panels))
    nrows = -(-len(panels) // ncols)
    height = max(len(p[2]) for p in panels) * 0.45 + 1.6
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.8 * ncols, height * nrows), layout="constrained", squeeze=False)
    for ax, (task, s, shown) in zip(axes.flat, panels):
        grid = shown[-1][1]
        rows = [(f"{label} {n}", recall) for label, g in shown for n, recall in zip(g.lengths, g.recall)]
        im = draw_heatmap(ax, [r for _, r in rows], grid.depths, [label for label, _ in rows],
                          f"{s.name}: {task} at {s.seq_len} tokens, {grid.trials} trials per cell", ylabel="checkpoint, length")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, label="recall", shrink=0.8)
    fig.suptitle("needle recall by depth, each stage before and after its training")
    return _save(fig, path)


def loss_figure(report: RunReport, path: Path) -> Optional[Path]:
    """Train and validation loss on one axis of steps, the stages one after another."""
    if not any("train/loss" in r for s in report.stages for r in s.metrics):
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(12, 4.2), layout="constrained")
    offset = 0
    for i, s in enumerate(report.stages):
        train = [(r["step"] + offset, r["train/loss"]) for r in s.metrics if "train/loss" in r]
        val = [(r["step"] + offset, r["val/loss"]) for r in s.metrics if "val/loss" in r]
        if train:
            ax.plot(*zip(*train), color="C0", lw=1, label="train" if i == 0 else None)
        if val:
            ax.plot(*zip(*val), "o-", color="C1", ms=3, lw=1, label="validation" if i == 0 else None)
        if i:
            ax.axvline(offset, color="0.4", ls="--", lw=0.8)
        ax.text(offset, 1.01, f" {s.name} ({s.seq_len})", transform=ax.get_xaxis_transform(), fontsize=9, va="bottom")
        offset += s.step
    ax.set_xlabel("optimizer step (stages one after another)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("training and validation loss across stages", pad=18)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    return _save(fig, path)


def position_figure(report: RunReport, path: Path) -> Optional[Path]:
    """Loss by position of every stage's gated model, overlaid (positions on a log axis)."""
    stages = [s for s in report.stages if s.position]
    if not stages:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.2), layout="constrained")
    for s in stages:
        p = s.position
        ends = p["bucket_starts"][1:] + [p["seq_len"]]  # type: ignore[index]
        centres = [(a + b) / 2 for a, b in zip(p["bucket_starts"], ends)]  # type: ignore[index]
        ax.plot(centres, p["loss"], marker="o", ms=3, label=f"{s.name} ({p['seq_len']} tokens, {p['windows']} windows)")  # type: ignore[index]
    ax.set_xscale("log")
    ax.set_xlabel("position in document (tokens, log scale)")
    ax.set_ylabel("mean loss (nats/token)")
    ax.set_title("loss by position after each stage")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _save(fig, path)


def throughput_figure(report: RunReport, path: Path) -> Optional[Path]:
    stages = [s for s in report.stages if s.tokens_per_s is not None]
    if not stages:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(stages) + 2), 3.8), layout="constrained")
    values = [s.tokens_per_s for s in stages]
    bars = ax.bar(range(len(stages)), values, color="C2")  # type: ignore[arg-type]
    ax.bar_label(bars, [f"{v:,.0f}" for v in values], fontsize=9)  # type: ignore[arg-type]
    ax.set_xticks(range(len(stages)), [f"{s.name}\n{s.seq_len} tokens" for s in stages])
    ax.set_ylabel("tokens/s per device")
    ax.set_title("training throughput per stage (median over logged windows)")
    ax.margins(y=0.15)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


FIGURES = (  # (file name, caption, builder)
    ("needle.png", "Needle recall", needle_figure),
    ("loss.png", "Loss across stages", loss_figure),
    ("position_loss.png", "Loss by position", position_figure),
    ("throughput.png", "Throughput", throughput_figure),
)


# -- writing -----------------------------------------------------------------------------

def write_run_report(folder: Path, out: Optional[Path] = None) -> Written:
    out = out or folder
    report = read_run(folder)
    stages = stage_table(report)
    blocks: list[tuple[str, Any]] = [("p", report.summary()), ("h2", "Stages"), ("table", stages)]
    for name, caption, build in FIGURES:
        path = build(report, out / FIGURES_DIR / name)
        if path is not None:
            blocks += [("h2", caption), ("img", (caption, path))]
    run = report.run
    meta = f"run folder {folder.resolve()}" + (f", run id {run.id}, created {run.created or '?'}" if run else "")
    written = write_page(out, f"Run report: {folder.name or folder.resolve().name}", meta, blocks)
    written.tables["stages"] = stages
    return written


def report_at_end(cfg: Config) -> None:
    """train.py's last step (rank 0), whatever the run's outcome: the run's report and, with
    ``logging.wandb``, its figures and table in the run's wandb group. A failure here is
    printed, never raised: the run's own outcome decides the exit code."""
    if not cfg.logging.report:
        return
    folder = Path(cfg.run.dir)
    try:
        written = write_run_report(folder)
        print(f"report: {written.html}", flush=True)
        if cfg.logging.wandb:
            run_config = OmegaConf.to_container(OmegaConf.structured(cfg))
            log_report(cfg.logging, run_id(folder), folder, run_config, written.figures, written.tables)  # type: ignore[arg-type]
    except Exception as e:  # noqa: BLE001 - any failure: the report is a by-product of the run
        print(f"report: not written for {folder} ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
