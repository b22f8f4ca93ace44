"""One table for a sweep: a row per job, read from the job folders.

``train.py -m`` prints it and writes it as ``report.md`` and ``report.csv`` into the sweep
folder when the sweep ends (longtrain/reporting/callback.py), with ``logging.report`` also
as a page, ``report.html`` (:func:`write_sweep_report`);
``python -m longtrain.reporting.sweep_report SWEEP_DIR`` does the same for any sweep
folder, finished or not. A row holds the job's swept overrides, per stage the needle recall before → after
and the short-context loss against its limit, the last validation loss, wall time, status
and objective (longtrain/sweep_job.py). Jobs that differ only in ``run.seed`` are also
summarised per recipe: mean ± standard deviation of each stage's recall and short loss.
"""

from __future__ import annotations

import csv
import html
import io
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from longtrain.reporting.tables import REPORT_HTML, REPORT_MD, Written, markdown_table, number_cell, short_loss_cell, write_page
from longtrain.run_dir import METRICS_FILE, read_metrics
from longtrain.run_files import GateRecord, JobRecord, read_gate, read_job_record

REPORT_CSV = "report.csv"
SEED_KEY = "run.seed"


@dataclass
class JobRow:
    record: JobRecord
    folder: Path
    gates: dict[str, GateRecord]  # stage name -> its gate.json, for the stages that wrote one
    val_loss: Optional[float]  # the last val/loss logged by the last stage that logged one

    @property
    def settings(self) -> dict[str, str]:
        """The job's overrides as key -> value (its own run.dir left out: every job has one)."""
        return dict(o.lstrip("+").split("=", 1) for o in self.record.overrides if "=" in o and not o.lstrip("+").startswith("run.dir="))

    def describe(self, keys: list[str]) -> str:
        """``key=value`` for each of ``keys`` this job set, e.g. the keys a sweep varied."""
        return " ".join(f"{k}={self.settings[k]}" for k in keys if k in self.settings)


@dataclass
class SweepReport:
    folder: Path
    rows: list[JobRow]

    @property
    def stages(self) -> list[str]:
        names: list[str] = []
        for row in self.rows:
            names += [s for s in row.record.stages if s not in names]
        return names

    def varying(self) -> list[str]:
        """Override keys whose value differs between jobs (what the sweep swept), in order."""
        keys: list[str] = []
        for row in self.rows:
            keys += [k for k in row.settings if k not in keys]
        return [k for k in keys if len({row.settings.get(k) for row in self.rows}) > 1]

    def best(self) -> Optional[JobRow]:
        scored = [r for r in self.rows if r.record.objective is not None]
        return max(scored, key=lambda r: r.record.objective) if scored else None  # type: ignore[arg-type, return-value]

    def failed(self) -> list[JobRow]:
        return [r for r in self.rows if r.record.code != 0]


def last_val_loss(metrics: Path) -> Optional[float]:
    values = [r["val/loss"] for r in read_metrics(metrics) if "val/loss" in r]
    return values[-1] if values else None


def read_sweep(folder: Path) -> SweepReport:
    """Every job folder (``folder/<job number>/job.json``) of a sweep, by job number."""
    rows = []
    for sub in sorted((p for p in folder.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        record = read_job_record(sub)
        if record is None:
            continue
        gates = {s: gate for s in record.stages if (gate := read_gate(sub / s)) is not None}
        losses = [last_val_loss(sub / s / METRICS_FILE) for s in record.stages]
        val = next((v for v in reversed(losses) if v is not None), None)
        rows.append(JobRow(record, sub, gates, val))
    return SweepReport(folder, rows)


def recall_cell(gate: Optional[GateRecord]) -> str:
    if gate is None:
        return ""
    return f"{number_cell(gate.recall_before)} → {number_cell(gate.recall)}"


def jobs_table(report: SweepReport) -> str:
    return markdown_table(*jobs_rows(report))


def jobs_rows(report: SweepReport) -> tuple[list[str], list[list[str]]]:
    """The jobs table's header and rows (Markdown here, HTML in longtrain/report.py)."""
    varying, stages = report.varying(), report.stages
    header = ["job", "overrides"] + [f"{s} recall" for s in stages] + [f"{s} short loss" for s in stages]
    header += ["val loss", "wall", "status", "objective"]
    rows = []
    for row in report.rows:
        rows.append(
            [str(row.record.job), row.describe(varying) or "–"]
            + [recall_cell(row.gates.get(s)) for s in stages]
            + [short_loss_cell(row.gates.get(s)) for s in stages]
            + [number_cell(row.val_loss, 3), f"{row.record.wall_s:.0f} s", row.record.status, number_cell(row.record.objective)]
        )
    return header, rows


def _mean_sd(values: list[float], group_size: int, digits: int) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    cell = f"{statistics.fmean(values):.{digits}f} ± {sd:.{digits}f}"
    return cell if len(values) == group_size else f"{cell} (n={len(values)})"


def seeds_table(report: SweepReport) -> Optional[str]:
    table = seeds_rows(report)
    return None if table is None else markdown_table(*table)


def seeds_rows(report: SweepReport) -> Optional[tuple[list[str], list[list[str]]]]:
    """Mean ± sample standard deviation over seeds, per recipe (the other swept keys)."""
    varying = report.varying()
    if SEED_KEY not in varying:
        return None
    recipes: dict[str, list[JobRow]] = {}
    for row in report.rows:
        recipe = row.describe([k for k in varying if k != SEED_KEY]) or "all jobs"
        recipes.setdefault(recipe, []).append(row)
    stages = report.stages
    header = ["recipe", "seeds"] + [f"{s} recall" for s in stages] + [f"{s} short loss" for s in stages]
    rows = []
    for recipe, group in recipes.items():
        per_stage = [[r.gates[s] for r in group if s in r.gates] for s in stages]
        rows.append(
            [recipe, str(len(group))]
            + [_mean_sd([g.recall for g in gates], len(group), 2) for gates in per_stage]
            + [_mean_sd([g.short_loss for g in gates], len(group), 3) for gates in per_stage]
        )
    return header, rows


def common_overrides(report: SweepReport) -> str:
    """The overrides every job shares, ``key=value`` (the first job's, less the swept keys)."""
    varying, first = report.varying(), report.rows[0]
    return first.describe([k for k in first.settings if k not in varying]) or "–"


def best_line(report: SweepReport) -> Optional[str]:
    best = report.best()
    if best is None:
        return None
    return (f"best: job {best.record.job} ({best.describe(report.varying()) or 'the only setting'}), "
            f"objective {best.record.objective:.4f} (last gated stage's recall, minus 1 if its short loss broke the limit)")


SEEDS_CAPTION = "Mean ± standard deviation over seeds:"


def markdown(report: SweepReport) -> str:
    parts = [f"# Sweep {report.folder}", "", f"common overrides: {common_overrides(report)}", "", jobs_table(report)]
    seeds = seeds_table(report)
    if seeds is not None:
        parts += ["", SEEDS_CAPTION, "", seeds]
    best = best_line(report)
    if best is not None:
        parts += ["", best]
    return "\n".join(parts) + "\n"


def csv_text(report: SweepReport) -> str:
    stages = report.stages
    out = io.StringIO()
    writer = csv.writer(out)
    fields = ["recall_before", "recall", "short_loss", "short_loss_limit", "passed"]  # per stage, as below
    writer.writerow(["job", "folder", "overrides", "status", "exit_code", "wall_s", "objective", "val_loss"]
                    + [f"{s}_{f}" for s in stages for f in fields])
    for row in report.rows:
        r = row.record
        cells: list[Any] = [r.job, row.folder, " ".join(r.overrides), r.status, r.code, f"{r.wall_s:.1f}", r.objective, row.val_loss]
        for s in stages:
            gate = row.gates.get(s)
            cells += [None] * 5 if gate is None else [
                gate.recall_before, gate.recall, gate.short_loss, gate.short_loss_limit(), gate.passed]
        writer.writerow(["" if c is None else c for c in cells])
    return out.getvalue()


def write_report(folder: Path) -> Optional[SweepReport]:
    """Read the sweep, write report.md and report.csv, print the Markdown; None: no jobs."""
    report = read_sweep(folder)
    if not report.rows:
        return None
    text = markdown(report)
    (folder / REPORT_MD).write_text(text)
    (folder / REPORT_CSV).write_text(csv_text(report))
    print(f"\n{text}\n(written to {folder / REPORT_MD} and {REPORT_CSV})", flush=True)
    return report


def write_sweep_report(report: SweepReport, out: Optional[Path] = None) -> Written:
    """The sweep's table as a page, with each job's own report linked."""
    out = out or report.folder
    blocks: list[tuple[str, Any]] = [("p", f"common overrides: {common_overrides(report)}"), ("table", jobs_rows(report))]
    seeds = seeds_rows(report)
    if seeds is not None:
        blocks += [("p", SEEDS_CAPTION), ("table", seeds)]
    best = best_line(report)
    if best is not None:
        blocks.append(("p", best))
    md = markdown(report)  # sweep_report's own text, as train.py -m writes it
    links = [(row.record.job, Path(os.path.relpath(row.folder / REPORT_HTML, out)).as_posix())
             for row in report.rows if (row.folder / REPORT_HTML).is_file()]
    if links:
        blocks.append(("html", "<p>job reports: " + " · ".join(f"<a href=\"{html.escape(p)}\">{job}</a>" for job, p in links) + "</p>"))
        md += "\njob reports: " + " · ".join(f"[{job}]({p})" for job, p in links) + "\n"
    return write_page(out, f"Sweep report: {report.folder.name}", f"sweep folder {report.folder.resolve()}", blocks, md)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python -m longtrain.reporting.sweep_report SWEEP_DIR (a folder of train.py -m jobs: multirun/<date> or the run.dir given)",
              file=sys.stderr)
        return 2
    if write_report(Path(argv[0])) is None:
        print(f"sweep_report: {argv[0]} holds no job folders with job.json (written by each job of train.py -m)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
