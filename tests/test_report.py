"""The run report (longtrain/reporting/run_report.py): written by train.py when a run ends, passed or
failed, and on demand for a run folder, a stopped run's folder and a sweep folder."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from longtrain.reporting import __main__ as report_module
from longtrain.reporting.run_report import read_run, write_run_report
from longtrain.run_dir import truncate_metrics
from longtrain.run_files import short_loss_limit
from tests.cli_utils import QUICK, ROOT, env, run_main, torchrun_cmd, train

# Its module-scoped fixture is built once: every test of the module runs on one xdist worker.
pytestmark = pytest.mark.xdist_group("report")

# Two stages of the CPU demo, cut to seconds: 64 then 512 tokens, a gate each (that passes),
# validation and loss by position, so every part of the report has something to show.
TWO_STAGES = [
    *(a for a in QUICK if not a.startswith(("stage=", "eval.val_every", "eval.position_buckets", "logging.report"))),
    "curriculum.stages=[cpu/induction,cpu/pretrain]", "stage.steps=4", "eval.val_every=2",
    "eval.position_buckets=4", "eval.position_windows=2", "gate.min_recall=0.0", "logging.report=true", "logging.log_every=1",
]


def report(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m longtrain.reporting ARGS``, in this process."""
    return run_main(report_module.main, args, cwd)


def table_row(md: str, stage: str) -> list[str]:
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {stage} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("report")
    proc = train(*TWO_STAGES, f"run.dir={cwd / 'run'}", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert f"report: {cwd / 'run' / 'report.html'}" in proc.stdout
    return cwd / "run"


@pytest.mark.e2e
def test_a_finished_run_has_its_report(finished_run, tmp_path):
    page, md = (finished_run / "report.html").read_text(), (finished_run / "report.md").read_text()
    gates = {s: json.loads((finished_run / s / "gate.json").read_text()) for s in ("induction", "pretrain")}
    # One self-contained page: its four figures inline, nothing fetched, no script.
    pngs = embedded_pngs(page)
    assert len(pngs) == 4 and all(p.startswith(b"\x89PNG") for p in pngs)
    assert "<script" not in page and "http" not in page
    for name in ("induction", "pretrain", "Needle recall", "Loss across stages", "Loss by position", "Throughput"):
        assert name in page
    assert "2 of 2 stages passed their gate." in md
    # The Markdown links the same figures, written beside it.
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    assert len(links) == 4 and all((finished_run / link).is_file() for link in links)
    # The stage table says what the gate records say.
    head = [c.strip() for c in md.splitlines()[md.splitlines().index("## Stages") + 2].strip("|").split("|")]
    row = dict(zip(head, table_row(md, "pretrain")))
    pretrain = gates["pretrain"]
    assert row["length"] == "512" and row["steps"] == "4" and row["tokens"] == f"{4 * 8 * 512 / 1e3:.1f}K"
    assert row["passkey recall before → after"] == f"{pretrain['recall_before']:.2f} → {pretrain['recall']:.2f} (≥ 0)"
    limit = short_loss_limit(gates["induction"]["short_loss"], pretrain["max_short_loss_increase"])
    assert row["short loss (limit)"] == f"{pretrain['short_loss']:.3f} ≤ {limit:.3f}"
    assert row["gate"] == "pass" and row["extra steps"] == "0"
    assert dict(zip(head, table_row(md, "induction")))["induction recall before → after"].startswith("– → ")

    # On demand, elsewhere: the same report.
    proc = report(str(finished_run), "--out", str(tmp_path / "again"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "again" / "report.md").read_text() == md
    assert len(embedded_pngs((tmp_path / "again" / "report.html").read_text())) == 4


@pytest.mark.e2e
def test_a_failed_gate_still_gets_its_report_and_keeps_its_exit_code(tmp_path):
    proc = train(*QUICK, "stage.steps=2", "gate.min_recall=1.0", "logging.report=true", f"run.dir={tmp_path / 'run'}",
                 cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("stage error: stage induction failed its gate")
    md = (tmp_path / "run" / "report.md").read_text()
    assert "0 of 4 stages passed their gate; failed: induction; not started: pretrain, extend_2k, extend_8k." in md
    assert table_row(md, "induction")[-2] == "FAIL"
    assert '<td class="fail">FAIL</td>' in (tmp_path / "run" / "report.html").read_text()


@pytest.mark.e2e
def test_under_torchrun_a_failed_gate_gets_its_report(tmp_path):
    """Rank 1 exits first and torchrun ends rank 0 (SIGTERM, recorded by preemption; SIGKILL 30 s later):
    the report is written all the same."""
    args = [*QUICK, "stage.steps=2", "gate.min_recall=1.0", "logging.report=true", "parallel.dp=2", f"run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(torchrun_cmd(2, *args), cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "stage induction failed its gate" in proc.stderr
    assert table_row((tmp_path / "run" / "report.md").read_text(), "induction")[-2] == "FAIL"
    assert len(embedded_pngs((tmp_path / "run" / "report.html").read_text())) == 3  # no loss by position: QUICK has none


@pytest.mark.e2e
def test_a_run_stopped_before_its_last_gate(finished_run, tmp_path):
    """A run killed mid-stage: the last stage has metrics up to the kill (the last line cut short)
    and no gate record."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns("checkpoints", "wandb", "report*"))
    for gone in ("gate.json", "needle", "position_loss.json", "position_loss.png"):
        path = run / "pretrain" / gone
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    truncate_metrics(run / "pretrain", 2)  # killed after step 2 of 4 ...
    with (run / "pretrain" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "ti')  # ... while writing step 3's line
    proc = report(str(run), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    md = (run / "report.md").read_text()
    assert "1 of 2 stages passed their gate; stopped before its gate: pretrain." in md
    row = table_row(md, "pretrain")
    assert row[3:5] == ["2 of 4", f"{2 * 8 * 512 / 1e3:.1f}K"] and row[-2] == "not gated: no gate.json (running, or stopped)" and row[-1] == "–"
    recall_before = json.loads((run / "pretrain" / "recall_before.json").read_text())["recall"]
    assert f"{recall_before:.2f} → –" in row  # the starting checkpoint's grid is all it has
    assert len(embedded_pngs((run / "report.html").read_text())) == 4


@pytest.mark.e2e
def test_a_gate_over_several_tasks_has_a_column_each(finished_run, tmp_path):
    """gate.json's per-task results and per-task grids (needle/<task>.json), when the gate has them."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns("checkpoints", "wandb", "report*"))
    gate_file = run / "pretrain" / "gate.json"
    gate = json.loads(gate_file.read_text())
    gate["tasks"] = {"passkey": {"recall": gate["recall"], "recall_before": gate["recall_before"], "min_recall": 0.0},
                     "kv": {"recall": 0.75, "recall_before": 0.25, "min_recall": 0.5}}
    gate_file.write_text(json.dumps(gate))
    grid = json.loads((run / "pretrain" / "needle" / "passkey.json").read_text())
    (run / "pretrain" / "needle" / "kv.json").write_text(json.dumps({**grid, "kind": "kv", "recall": [[0.75]]}))
    written = write_run_report(run)
    md = written.md.read_text()
    head = [c.strip() for c in md.splitlines()[md.splitlines().index("## Stages") + 2].strip("|").split("|")]
    row = dict(zip(head, table_row(md, "pretrain")))
    assert row["kv recall before → after"] == "0.25 → 0.75 (≥ 0.5)"
    assert row["passkey recall before → after"].endswith("(≥ 0)")
    assert {"passkey", "kv"} <= read_run(run).stages[1].after.keys()  # passkey.json and kv.json (and the reported tasks)


@pytest.mark.parametrize("make, says", [
    (lambda p: p / "missing", "is not a folder"),
    (lambda p: p, "holds neither stage folders"),
])
def test_a_folder_without_a_run_is_one_line(tmp_path, make, says):
    proc = report(str(make(tmp_path)), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and says in proc.stderr, proc.stderr
    assert not (tmp_path / "report.html").exists()


def test_the_readme_screenshot_script_checks_its_arguments(tmp_path):
    """docs/screenshot.sh (it needs chromium, which CI lacks): a wrong call is one usage line."""
    proc = subprocess.run(["bash", str(ROOT / "docs" / "screenshot.sh"), str(tmp_path / "missing")], capture_output=True,
                          text=True, env=env(), timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: docs/screenshot.sh RUN_DIR") and proc.stderr.count("\n") == 1
