"""Progress for a person watching: step of total, elapsed and ETA on the training line, and
the gate's evaluation saying which task and how many samples are done, on the terminal
only (metrics.jsonl is unchanged) and not at all with logging.progress=false."""

from __future__ import annotations

import json
from unittest import mock

import torch

from longtrain import curriculum
from longtrain.config import LoggingConfig
from longtrain.logging import MetricsLogger
from longtrain.trainer import meter
from longtrain.trainer.meter import Meter, duration


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
