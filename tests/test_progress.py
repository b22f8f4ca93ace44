"""Progress for a person watching: step of total, elapsed and ETA on the training line, and
the gate's evaluation saying which task and how many samples are done, on the terminal
only (metrics.jsonl is unchanged) and not at all with logging.progress=false; each
stage's estimated wall time before its first step and in the dry run."""

from __future__ import annotations

import json
import re
from unittest import mock

import torch

from longtrain import curriculum
from longtrain.config import LoggingConfig
from longtrain.logging import MetricsLogger
from longtrain.trainer import meter
from longtrain.trainer.meter import Meter, duration
from tests.cli_utils import QUICK, train_in_process


def logger(tmp_path, progress: bool = True) -> MetricsLogger:
    return MetricsLogger(tmp_path / "metrics.jsonl", LoggingConfig(progress=progress), enabled=True,
                         run_config={}, run_id="test", stage="s", wandb_dir=tmp_path)


def test_duration_and_eta():
    assert duration(59) == "0:59" and duration(125) == "2:05" and duration(3725) == "1:02:05"
    clock = iter([0.0] * 4 + [100.0])  # the window and the ETA clock, at construction and at start
    with mock.patch.object(meter.time, "perf_counter", lambda: next(clock)):
        m = Meter(10, 64, 1, 1e6, None)
        m.start(20)  # resumed at step 20: the pace counts only this process's steps
        assert m.progress(30, 120) == "step 30/120  1:40 elapsed  ETA 15:00"


def test_progress_goes_to_the_terminal_not_the_metrics(tmp_path, capsys):
    log = logger(tmp_path)
    log.log(30, {"loss": 1.5}, progress="step 30/120  1:40 elapsed  ETA 15:00")
    assert capsys.readouterr().out == "[train] step 30/120  1:40 elapsed  ETA 15:00  loss 1.5\n"
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert set(record) == {"step", "time", "train/loss"}


def test_gate_evaluation_says_how_many_samples_are_done(tmp_path, capsys):
    clock = iter([0.0, 10.0, 40.0, 50.0, 55.0])
    with mock.patch.object(curriculum.time, "perf_counter", lambda: next(clock)):
        score = curriculum.counting_progress(lambda ids, pos, labels: ids.float(), "passkey at 8192", 10, logger(tmp_path))
        for batch in (4, 4, 2):
            score(torch.zeros(batch, 3), torch.zeros(batch, 3), torch.zeros(batch, 3))
    # Samples 4 (10 s: too soon for a line), 8 (40 s), 10 (the last, always said).
    assert capsys.readouterr().out.splitlines() == [
        "[gate] passkey at 8192: 8/10 samples  0:40 elapsed",
        "[gate] passkey at 8192: 10/10 samples  0:50 elapsed",
    ]
    quiet = curriculum.counting_progress(lambda ids, pos, labels: ids.float(), "passkey at 8192", 1, logger(tmp_path, progress=False))
    quiet(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 3))
    assert capsys.readouterr().out == ""


def test_estimate_on_a_cpu_is_the_flops_against_the_measured_rate(compose_config):
    from longtrain.run_config import load_config

    cfg = load_config(compose_config("preset=cpu_demo", "stage=cpu/pretrain"))
    with mock.patch.object(meter, "cpu_matmul_tflops", lambda: 0.01 / meter.CPU_TRAINING_SHARE):
        line = meter.estimate_line(cfg, 10**6, 100, 1, torch.device("cpu"), None)
    seconds = meter.flops_per_token(cfg, 10**6) * 8 * 512 * 100 / 0.01e12
    assert line.startswith(f"stage pretrain: estimated {duration(seconds)} for 100 steps (an estimate: ")
    assert "10.0 GFLOP/s from a matmul measured on this CPU" in line and "cpu_demo" not in line


def test_estimate_on_a_gpu_assumes_an_mfu_of_its_peak(compose_config):
    from longtrain.run_config import load_config

    cfg = load_config(compose_config("stage=pretrain"))
    line = meter.estimate_line(cfg, 10**8, 20000, 8, torch.device("cuda"), 989.0)
    assert "989 TFLOP/s peak at an assumed 40% MFU" in line and "cpu_demo" not in line
    assert "no time estimate" in meter.estimate_line(cfg, 10**8, 20000, 8, torch.device("cuda"), None)


def test_the_cpu_probe_is_short_cached_and_leaves_the_rng_alone():
    meter.cpu_matmul_tflops.cache_clear()
    state = torch.get_rng_state()
    first = meter.cpu_matmul_tflops()
    assert first > 0 and meter.cpu_matmul_tflops() == first  # measured once per process
    assert torch.equal(torch.get_rng_state(), state)  # a run's numbers cannot depend on it


def test_dry_run_on_a_cpu_estimates_every_gpu_stage_and_names_the_cpu_demo(tmp_path):
    proc = train_in_process("run.dry_run=true", f"run.dir={tmp_path / 'run'}", "run.device=cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for stage in ("pretrain", "extend_32k", "extend_128k"):
        (line,) = [x for x in proc.stdout.splitlines() if x.startswith(f"stage {stage}: estimated ")]
        assert "days" in line and "an estimate" in line and line.endswith("on a CPU run preset=cpu_demo")


def test_a_run_prints_its_estimate_before_its_first_step(tmp_path):
    """The estimate line comes before the first step and states its FLOPs and the rate it
    measured; its time is their ratio. How close it comes to the real time depends on what
    else shares the CPU, so that is not asserted (a timed assertion fails on a loaded machine)."""
    proc = train_in_process(*QUICK, "gate.min_recall=0", "logging.progress=true", "logging.log_every=1",
                            f"run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    estimate = next(i for i, x in enumerate(lines) if x.startswith("stage induction: estimated "))
    first_step = next(i for i, x in enumerate(lines) if x.startswith("[train] step 1/6"))
    assert estimate < first_step and "cpu_demo" not in lines[estimate]
    line = re.match(r"stage induction: estimated (\S+) for 6 steps \(an estimate: (\S+) FLOPs at (\S+) GFLOP/s", lines[estimate])
    assert line and re.search(r"^\[train\] step 6/6  (\S+) elapsed", proc.stdout, re.M), proc.stdout
    flops, rate = float(line[2]), float(line[3]) * 1e9
    assert abs(seconds(line[1]) - flops / rate) <= 1 + 0.05 * flops / rate, proc.stdout  # rounding of the printed values


def seconds(text: str) -> int:
    """``1:02:03`` or ``2:03`` (meter.duration's format) in seconds."""
    total = 0
    for part in text.split(":"):
        total = total * 60 + int(part)
    return total
