"""Sweeps as a user runs them: configs/sweep/*, the table at the end of a multirun and on
demand, the objective a sweeper sees, Optuna through submitit_local, a missing extra."""

from __future__ import annotations

import csv
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from longtrain.reporting import sweep_report
from tests.cli_utils import QUICK, ROOT, TRAIN, env, run_main, train, train_in_process

# Gated within seconds: 2 steps of the CPU demo's first stage, one needle.
SHORT = [*QUICK, "stage.steps=2", "eval.val_every=2"]


def report_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "report.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.e2e
def test_rope_method_sweep_one_job_per_method_and_a_failed_gate_is_a_row(tmp_path):
    # gate.min_recall=1.0 cannot be met after 2 steps, 0.0 always is: every method has a failed
    # job, and the jobs after each failure still run.
    proc = train("-m", "+sweep=rope_method", *SHORT, "gate.min_recall=1.0,0.0", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    (sweep,) = (tmp_path / "multirun").iterdir()
    rows = report_rows(sweep)
    assert [int(r["job"]) for r in rows] == list(range(10))
    methods = [next(o.split("=")[1] for o in r["overrides"].split() if o.startswith("rope=")) for r in rows]
    assert methods == [m for m in ("abf", "yarn", "linear", "dynamic", "llama3") for _ in (0, 1)]
    assert [r["status"] for r in rows] == ["gate failed", "passed"] * 5
    for job, row in enumerate(rows):  # each job in its own folder, its gate record there
        assert tmp_path / row["folder"] == sweep / str(job)  # relative to where the sweep ran
        gate = json.loads((sweep / str(job) / "induction" / "gate.json").read_text())
        assert float(row["induction_recall"]) == gate["recall"] and float(row["induction_short_loss"]) == gate["short_loss"]
        assert float(row["objective"]) == gate["recall"]  # the first stage: no short-loss limit
        assert float(row["val_loss"]) > 0 and float(row["wall_s"]) > 0
        assert json.loads((sweep / str(job) / "job.json").read_text())["code"] == (1 if job % 2 == 0 else 0)
    printed = proc.stdout[proc.stdout.index("| job | overrides"):]
    assert "| 8 | rope=llama3 gate.min_recall=1.0 |" in printed and "gate failed" in printed
    assert printed.split("\n\n")[0] in (sweep / "report.md").read_text()
    assert proc.stderr.strip().splitlines()[-1] == "sweep: job(s) 0, 2, 4, 6, 8 failed (their errors are above)"

    # On demand, for the same folder: the same table.
    again = subprocess.run([sys.executable, "-m", "longtrain.reporting.sweep_report", str(sweep)], capture_output=True,
                           text=True, env=env(), cwd=tmp_path, timeout=60)
    assert again.returncode == 0, again.stderr
    assert printed.split("\n\n")[0] in again.stdout


@pytest.mark.e2e
def test_a_job_with_a_bad_value_is_a_config_error_row_and_the_sweep_goes_on(tmp_path):
    proc = train("-m", *SHORT, "gate.min_recall=0.0", "optim.lr=-1,1e-3", f"run.dir={tmp_path / 'lr'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr  # the worst job's code
    assert "config error: optim.lr: must be > 0, got -1" in proc.stderr
    rows = report_rows(tmp_path / "lr")
    assert [(r["status"], r["exit_code"], r["objective"]) for r in rows][0] == ("config error", "2", "")
    assert rows[1]["status"] == "passed" and float(rows[1]["induction_recall"]) >= 0
    assert not (tmp_path / "lr" / "0" / "induction").exists()  # nothing computed for the bad job


@pytest.mark.e2e
def test_seeds_sweep_adds_mean_and_spread_per_recipe(tmp_path):
    proc = train("-m", "+sweep=seeds", *SHORT, "gate.min_recall=0.0", "rope=abf,yarn", f"run.dir={tmp_path / 'seeds'}",
                 "logging.report=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = report_rows(tmp_path / "seeds")
    assert len(rows) == 6
    text = (tmp_path / "seeds" / "report.md").read_text()
    summary = text[text.index("Mean ± standard deviation over seeds"):]
    for rope in ("abf", "yarn"):
        losses = [float(r["induction_short_loss"]) for r in rows if f"rope={rope}" in r["overrides"].split()]
        assert len(losses) == 3 and len(set(losses)) > 1  # the seeds differ
        line = next(ln for ln in summary.splitlines() if ln.startswith(f"| rope={rope} |"))
        assert line.split(" | ")[1] == "3" and f"{statistics.fmean(losses):.3f} ± {statistics.stdev(losses):.3f}" in line

    # The run report of the sweep folder: the same tables as one page, each job's own report linked;
    # written when the sweep ended, and again on demand.
    assert f"report: {tmp_path / 'seeds' / 'report.html'}" in proc.stdout
    (tmp_path / "seeds" / "report.html").unlink()
    page = subprocess.run([sys.executable, "-m", "longtrain.reporting", str(tmp_path / "seeds")], capture_output=True,
                          text=True, env=env(), cwd=tmp_path, timeout=60)
    assert page.returncode == 0, page.stderr
    assert (tmp_path / "seeds" / "report.md").read_text().startswith(text)  # sweep_report's Markdown, and the links
    html = (tmp_path / "seeds" / "report.html").read_text()
    assert html.count("<tr>") == 1 + 6 + 1 + 2  # jobs table (header + a row per job), seeds table (header + 2 recipes)
    swept = [set(cells[1].split()) for cells in (re.findall(r"<td>([^<]*)</td>", row) for row in html.split("<tr>")[2:8])]
    assert sorted(map(sorted, swept)) == sorted(sorted([f"rope={r}", f"run.seed={s}"]) for r in ("abf", "yarn") for s in (0, 1, 2))
    for job in range(6):
        assert f'<a href="{job}/report.html">{job}</a>' in html and (tmp_path / "seeds" / str(job) / "report.html").is_file()


@pytest.mark.e2e  # the README's sweep commands, each a multirun of whole-command compositions
@pytest.mark.parametrize("name, extra, jobs, shown", [
    ("rope_method", [], 5, "llama3 ×16"),
    ("abf_base", ["stage=cpu/extend_2k"], 5, "abf θ=320000"),
    ("extension_lr", ["stage=cpu/extend_2k"], 4, "extend_2k"),
    ("data_mix", ["stage=cpu/extend_2k"], 6, "extend_2k"),
    ("seeds", ["rope=abf,yarn"], 6, "yarn ×16"),
])
def test_readme_sweep_commands_validate(tmp_path, name, extra, jobs, shown):
    """Every sweep in configs/sweep/ as the README runs it, validated: one plan per job."""
    proc = train_in_process("-m", f"+sweep={name}", "preset=cpu_demo", *extra, "run.dry_run=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("=== job ") == jobs and proc.stdout.count("nothing written") == jobs
    assert shown in proc.stdout
    assert not list(tmp_path.rglob("job.json"))  # a dry run writes no job records


def test_every_sweep_file_says_what_it_answers():
    for path in (ROOT / "configs" / "sweep").glob("*.yaml"):
        lines = path.read_text().splitlines()
        assert lines[0] == "# @package _global_", path
        assert "?" in " ".join(ln for ln in lines if ln.startswith("#")), f"{path}: no question in its comment"


def test_a_sweep_without_multirun_is_one_line(tmp_path):
    proc = train_in_process("+sweep=rope_method", "preset=cpu_demo", "run.dry_run=true", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "config error: sweep: +sweep=rope_method is a sweep (one job per setting); add -m: python train.py -m +sweep=rope_method ..."
    ), proc.stderr


def test_report_of_a_folder_without_jobs_is_one_line(tmp_path):
    proc = run_main(sweep_report.main, [str(tmp_path)], tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "job.json" in proc.stderr


@pytest.mark.e2e
def test_optuna_search_runs_trials_through_submitit_local_and_prints_the_best(tmp_path):
    # min_recall 1.0 fails every gate after 2 steps: failed gates are finished trials with values.
    proc = train("-m", "+sweep=search_lr_retrieval", "hydra/launcher=submitit_local", "hydra.sweeper.n_trials=2",
                 *SHORT, "gate.min_recall=1.0", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr  # the worst job's code: a failed gate
    (sweep,) = (tmp_path / "multirun").iterdir()
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2  # two separate processes, one after the other (n_jobs: 1)
    assert proc.stderr.strip().splitlines()[-1] == f"sweep: job(s) 0, 1 failed (their errors are in {sweep.relative_to(tmp_path) / '.submitit'}/*/*_log.err)"
    assert "stage error: stage induction failed its gate" in "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_log.err"))
    rows = report_rows(sweep)
    assert [r["status"] for r in rows] == ["gate failed"] * 2
    trials = []
    for row in rows:
        swept = dict(o.split("=", 1) for o in row["overrides"].split() if o.startswith(("optim.lr=", "stage.retrieval_share=")))
        assert 1e-4 <= float(swept["optim.lr"]) <= 3e-3 and 0.25 <= float(swept["stage.retrieval_share"]) <= 0.75
        trials.append((float(row["objective"]), swept))
    assert len({t[1]["optim.lr"] for t in trials}) == 2  # the sampler proposed two settings
    best_value, best = max(trials, key=lambda t: t[0])
    best_line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("best: job "))
    assert f"optim.lr={best['optim.lr']} stage.retrieval_share={best['stage.retrieval_share']}" in best_line
    optuna = (sweep / "optimization_results.yaml").read_text()  # the sweeper's own verdict agrees
    assert f"optim.lr: {best['optim.lr']}" in optuna and f"best_value: {best_value}" in optuna


HIDE = "import runpy, sys\nfor m in sys.argv[1].split(','): sys.modules[m] = None\nsys.argv = [sys.argv[2], *sys.argv[3:]]\nrunpy.run_path(sys.argv[0], run_name='__main__')"


@pytest.mark.e2e  # a machine without the extra: the plugin hidden before Hydra looks for plugins
@pytest.mark.parametrize("hidden, args, line", [
    ("hydra_plugins.hydra_optuna_sweeper", ["+sweep=search_lr_retrieval"],
     'config error: hydra/sweeper: optuna needs the optional extra "sweep": pip install -e ".[sweep]"'),
    ("hydra_plugins.hydra_submitit_launcher", ["hydra/launcher=submitit_local", "optim.lr=1e-3,2e-3"],
     'config error: hydra/launcher: submitit_local needs the optional extra "sweep": pip install -e ".[sweep]"'),
    ("hydra_plugins.hydra_submitit_launcher", ["hydra/launcher=slurm", "optim.lr=1e-3,2e-3"],
     'config error: hydra/launcher: submitit_slurm needs the optional extra "sweep": pip install -e ".[sweep]"'),
    ("optuna", ["+sweep=search_lr_retrieval"],
     'config error: optuna: not installed; the sweeper or launcher chosen needs the optional extra "sweep": pip install -e ".[sweep]"'),
])
def test_a_missing_sweep_extra_is_one_line_naming_it(tmp_path, hidden, args, line):
    """The plugin (or the package it imports) made unimportable, as on a machine without the extra."""
    proc = subprocess.run([sys.executable, "-c", HIDE, hidden, TRAIN, "-m", *args, "preset=cpu_demo", "run.dry_run=true"],
                          capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == line, proc.stderr
    assert not list(tmp_path.rglob("job.json"))


def test_slurm_launcher_takes_nodes_gpus_time_and_partition_from_config(tmp_path):
    proc = train_in_process("hydra/launcher=slurm", "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=4",
                            "hydra.launcher.timeout_min=90", "hydra.launcher.partition=gpu", "--cfg", "hydra", "--resolve",
                            "--package", "hydra.launcher", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    launcher = {k: v.strip() for k, _, v in (ln.partition(":") for ln in proc.stdout.splitlines() if ":" in ln)}
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["nodes"], launcher["gpus_per_node"], launcher["tasks_per_node"]) == ("2", "4", "4")  # a task per GPU
    assert (launcher["timeout_min"], launcher["partition"]) == ("90", "gpu")
