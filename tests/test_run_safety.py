"""train.py as a user runs it: run folders that belong to one run, sweeps whose jobs are
isolated, SIGTERM, divergence, wandb, and the README's commands."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from longtrain import checkpoint as ckpt
from longtrain.preemption import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, SAME_PRESS_S
from longtrain.run_files import read_gate
from tests.cli_utils import QUICK, ROOT, TRAIN, env, train, train_in_process, train_losses


def one_line(proc: subprocess.CompletedProcess, prefix: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), proc.stderr
    return lines[0]


@pytest.mark.e2e
def test_a_second_run_in_the_same_folder(tmp_path):
    run = [*QUICK, "gate.min_recall=0", f"run.dir={tmp_path / 'run'}"]
    first = train(*run, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    metrics = tmp_path / "run" / "induction" / "metrics.jsonl"
    logged = metrics.read_text()

    refused = train_in_process(*run, cwd=tmp_path)  # a fresh start would mix two runs' state
    assert refused.returncode == 2 and "run.resume=auto" in one_line(refused, "config error: run.dir:")
    assert metrics.read_text() == logged

    resumed = train(*run, "run.resume=auto", cwd=tmp_path)  # the stage is done: nothing retrains
    assert resumed.returncode == 0, resumed.stderr
    assert metrics.read_text().startswith(logged) and "train/loss" not in metrics.read_text()[len(logged):]

    again = train(*run, "run.overwrite=true", "stage.steps=2", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert sorted(train_losses(tmp_path / "run" / "induction")) == [2]  # the old run's metrics are gone
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "run" / "induction" / "checkpoints")] == ["step_00000002"]


@pytest.mark.e2e
def test_sweep_jobs_get_their_own_folders_and_a_failed_gate_does_not_stop_the_sweep(tmp_path):
    # Job 0 cannot pass (recall 1.0 of one needle after 2 steps); job 1 passes.
    proc = train("-m", *QUICK, "stage.steps=2", "gate.min_recall=1.0,0.0", cwd=tmp_path)
    assert proc.returncode == 1
    assert "=== job 0" in proc.stdout and "=== job 1" in proc.stdout
    assert "stage error: stage induction failed its gate" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "sweep: job(s) 0 failed (their errors are above)"
    (sweep,) = (tmp_path / "multirun").iterdir()
    gates = [json.loads((sweep / str(j) / "induction" / "gate.json").read_text()) for j in (0, 1)]
    assert [g["passed"] for g in gates] == [False, True]
    assert gates[0]["checkpoint"].startswith(str(sweep / "0"))
    ids = {json.loads((sweep / str(j) / "run.json").read_text())["id"] for j in (0, 1)}
    assert len(ids) == 2  # two runs, two identities

    named = train("-m", *QUICK, "stage.steps=2", "gate.min_recall=0.0", "optim.lr=1e-3,2e-3",
                  f"run.dir={tmp_path / 'lr'}", cwd=tmp_path)
    assert named.returncode == 0, named.stderr
    assert sorted(p.name for p in (tmp_path / "lr").iterdir()) == ["0", "1", "report.csv", "report.md"]  # run.dir/<job>


def wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if metrics.is_file() and any(s >= step for s in train_losses(metrics.parent)):
            return
        time.sleep(0.2)
    raise TimeoutError(f"no step {step} in {metrics}")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Callable[[list[str], list[str]], dict]:
    """The losses of an uninterrupted run of a command, run once per module and worker: the
    reference of both the SIGTERM and the Ctrl-C test of that launcher."""
    losses: dict[tuple[str, ...], dict] = {}

    def run(command: list[str], run_args: list[str]) -> dict:
        key = (*command, *run_args)
        if key not in losses:
            folder = tmp_path_factory.mktemp("straight")
            straight = subprocess.run([*command, *run_args, f"run.dir={folder}"], cwd=folder, env=env(),
                                      capture_output=True, text=True, timeout=600)
            assert straight.returncode == 0, straight.stderr
            losses[key] = train_losses(folder / "induction")
        return losses[key]

    return run


def stop_then_resume(tmp_path: Path, command: list[str], run_args: list[str],
                     sig: signal.Signals = signal.SIGTERM) -> tuple[dict, subprocess.CompletedProcess]:
    """The losses of a run stopped by ``sig`` then resumed; the stopped process."""
    run_dir = tmp_path / "stopped"
    proc = subprocess.Popen([*command, *run_args, f"run.dir={run_dir}"], cwd=tmp_path, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(run_dir / "induction" / "metrics.jsonl", 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=240)
    stopped = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    resumed = subprocess.run([*command, *run_args, f"run.dir={run_dir}", "run.resume=auto"], cwd=tmp_path,
                             env=env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    return train_losses(run_dir / "induction"), stopped


STOPPABLE = [*QUICK, "stage.steps=12", "run.checkpoint_every=100", "gate.min_recall=0", "logging.log_every=1"]
TORCHRUN_CP2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN]


# The four stop-and-resume tests share their uninterrupted references (``uninterrupted``):
# one worker runs them.
@pytest.mark.e2e
@pytest.mark.xdist_group("stop_and_resume")
def test_sigterm_checkpoints_and_the_resumed_run_matches(tmp_path, uninterrupted):
    got, stopped = stop_then_resume(tmp_path, [sys.executable, TRAIN], STOPPABLE)
    assert "preempted: SIGTERM at step" in stopped.stderr and "run.resume=auto" in stopped.stderr
    assert got == uninterrupted([sys.executable, TRAIN], STOPPABLE)  # bitwise: the same losses at every step


@pytest.mark.e2e
@pytest.mark.xdist_group("stop_and_resume")
def test_sigterm_under_torchrun_cp2_resumes_bitwise(tmp_path, uninterrupted):
    got, stopped = stop_then_resume(tmp_path, TORCHRUN_CP2, [*STOPPABLE, "parallel.cp=2"])
    assert "preempted: SIGTERM at step" in stopped.stderr
    assert got == uninterrupted(TORCHRUN_CP2, [*STOPPABLE, "parallel.cp=2"])


def assert_interrupted_at_a_saved_step(stopped: subprocess.CompletedProcess, checkpoints: Path) -> None:
    """Ctrl-C's one line, no traceback of ours, and the checkpoint of the step it names.
    (torchrun prints its own traceback for the SIGINT it forwarded: its frames, not ours.)"""
    assert "KeyboardInterrupt" not in stopped.stderr and f'File "{ROOT}' not in stopped.stderr, stopped.stderr
    (line,) = [x for x in stopped.stderr.splitlines() if x.startswith("interrupted at step")]
    step = int(line.split()[3].rstrip(","))
    assert line == f"interrupted at step {step}, checkpoint saved: resume with run.resume=auto"
    assert ckpt.checkpoint_dir(checkpoints, step) in ckpt.complete_checkpoints(checkpoints)


@pytest.mark.e2e
@pytest.mark.xdist_group("stop_and_resume")
def test_ctrl_c_finishes_the_step_saves_and_the_resumed_run_matches(tmp_path, uninterrupted):
    got, stopped = stop_then_resume(tmp_path, [sys.executable, TRAIN], STOPPABLE, signal.SIGINT)
    assert stopped.returncode == INTERRUPTED_EXIT_CODE and "Traceback" not in stopped.stderr, stopped.stderr
    assert_interrupted_at_a_saved_step(stopped, tmp_path / "stopped" / "induction" / "checkpoints")
    assert got == uninterrupted([sys.executable, TRAIN], STOPPABLE)  # bitwise


@pytest.mark.e2e
@pytest.mark.xdist_group("stop_and_resume")
def test_ctrl_c_under_torchrun_cp2_resumes_bitwise(tmp_path, uninterrupted):
    # torchrun forwards SIGINT to its ranks; each finishes the step, and they save together.
    got, stopped = stop_then_resume(tmp_path, TORCHRUN_CP2, [*STOPPABLE, "parallel.cp=2"], signal.SIGINT)
    assert stopped.returncode != 0, stopped.stderr  # torchrun reports the SIGINT it forwarded in its own way
    assert_interrupted_at_a_saved_step(stopped, tmp_path / "stopped" / "induction" / "checkpoints")
    assert got == uninterrupted(TORCHRUN_CP2, [*STOPPABLE, "parallel.cp=2"])


@pytest.mark.e2e
def test_a_second_ctrl_c_stops_at_once_and_resume_takes_a_complete_checkpoint(tmp_path):
    # Steps of seconds (a big batch), so that both presses land in the same step or its save.
    heavy = ["stage.global_batch_size=512", "stage.micro_batch_size=512", "run.checkpoint_every=1"]
    proc = subprocess.Popen([sys.executable, TRAIN, *STOPPABLE, *heavy, "stage.steps=200", f"run.dir={tmp_path}"],
                            cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path / "induction" / "metrics.jsonl", 1, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(2 * SAME_PRESS_S)  # a second press, not the first one's echo
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == INTERRUPTED_EXIT_CODE and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("interrupted again: stopped at once"), err
    # What run.resume=auto would load: the newest complete checkpoint, whole (a .tmp never is one).
    latest = ckpt.latest_checkpoint(tmp_path / "induction" / "checkpoints")
    assert latest is not None and ckpt.verify_checkpoint(latest) is None


@pytest.mark.e2e
def test_sigterm_exit_code(tmp_path):
    proc = subprocess.Popen([sys.executable, TRAIN, *STOPPABLE, "stage.steps=200", f"run.dir={tmp_path}"],
                            cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path / "induction" / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == PREEMPTED_EXIT_CODE
    saved = ckpt.latest_checkpoint(tmp_path / "induction" / "checkpoints")
    assert saved is not None and f"saved {saved}" in err


@pytest.mark.e2e
def test_divergence_stops_with_one_line_and_no_nan_checkpoint(tmp_path):
    proc = train(*QUICK, "stage.steps=40", "run.checkpoint_every=1", "optim.lr=1e6", "stage.warmup_steps=0",
                 f"run.dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 1
    line = one_line(proc, "diverged: stage induction diverged: 5 steps in a row")
    assert "last good checkpoint" in line
    saved = ckpt.complete_checkpoints(tmp_path / "induction" / "checkpoints")
    assert saved  # the steps before the loss blew up
    for path in saved:
        dcp_to_torch_save(path, tmp_path / "weights.pt")
        weights = torch.load(tmp_path / "weights.pt", weights_only=False)["model"]
        assert all(torch.isfinite(w).all() for w in weights.values()), path


def wandb_history(run_folder: Path) -> list[dict]:
    """The history records of an offline wandb run, read from its ``run-*.wandb`` file: the
    LevelDB log format (32 KiB blocks; each piece headed by crc32, length, type) after a
    7-byte file header, holding wandb's protobuf records."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_folder.glob("run-*.wandb")
    data, pos, piece, rows = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if left < 7 or (kind == 0 and length == 0):  # block trailer / padding
            pos += left
            continue
        piece += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record.FromString(piece)
            piece = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


@pytest.mark.e2e
def test_wandb_offline_through_a_curriculum_with_extra_gate_steps(tmp_path):
    pytest.importorskip("wandb")
    run_env = {**env(), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    args = [*QUICK, "stage.steps=2", "logging.wandb=true", "gate.min_recall=1.0", "gate.max_extra_steps=4",
            "gate.extra_steps_increment=2", "logging.report=true", f"run.dir={tmp_path / 'run'}"]
    proc = subprocess.run([sys.executable, TRAIN, *args], cwd=tmp_path, env=run_env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1 and "after 4 extra steps" in proc.stderr  # the gate cannot pass; no crash
    assert not (tmp_path / "wandb").exists()  # wandb's files live in the run folder
    wandb_dir = tmp_path / "run" / "wandb"
    run_id = json.loads((tmp_path / "run" / "run.json").read_text())["id"]
    (stage_run,) = wandb_dir.glob(f"offline-run-*-{run_id}-induction")
    assert train_losses(tmp_path / "run" / "induction").keys() == {2, 4, 6}  # stage end, then each increment
    gate_rows = [json.loads(x) for x in (tmp_path / "run" / "induction" / "metrics.jsonl").read_text().splitlines()]
    assert any("gate/recall" in r for r in gate_rows)
    # What wandb holds: the gate's decision and its needle heatmap (a file in the run's media) ...
    history = wandb_history(stage_run)
    gate = json.loads((tmp_path / "run" / "induction" / "gate.json").read_text())
    (decision,) = [r for r in history if "gate/passed" in r]
    assert (decision["step"], decision["gate/passed"], decision["gate/extra_steps"]) == (6, 0, 4)
    assert decision["gate/recall"] == pytest.approx(gate["recall"]) and decision["gate/short_loss"] == pytest.approx(gate["short_loss"])
    (pictures,) = [r for r in history if "gate/needle/induction/path" in r]
    assert (stage_run / "files" / pictures["gate/needle/induction/path"]).is_file()
    # ... and, in the run's "report" wandb run, the run report's figures and stage table.
    (report_run,) = wandb_dir.glob(f"offline-run-*-{run_id}-report")
    (logged,) = wandb_history(report_run)
    for figure in ("needle", "loss", "throughput"):
        assert (report_run / "files" / logged[f"report/{figure}/path"]).is_file()
    table = json.loads((report_run / "files" / logged["report/stages/path"]).read_text())
    assert table["columns"][:2] == ["stage", "length"] and table["data"][0][0] == "induction" and "FAIL" in table["data"][0]
    # A resume appends to the same wandb runs (same ids), and so does its gate.
    again = subprocess.run([sys.executable, TRAIN, *args, "run.resume=auto"], cwd=tmp_path, env=run_env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 1
    assert {p.name.split("-", 3)[3] for p in wandb_dir.glob("offline-run-*")} == {f"{run_id}-induction", f"{run_id}-report"}


@pytest.mark.e2e  # the README's sbatch command, composed as a whole
def test_sbatch_command_validates_at_two_nodes_of_eight(tmp_path, monkeypatch):
    """The README's `sbatch --nodes=2 launch/slurm.sbatch parallel.dp=2 parallel.cp=8`, as its
    16 ranks would see it (dry run); tests/test_docs.py dry-runs every train.py and torchrun
    command of the docs, and runs the script itself under stand-ins for srun."""
    monkeypatch.setenv("WORLD_SIZE", "16")
    proc = train_in_process("parallel.dp=2", "parallel.cp=8", "run.dry_run=true", f"run.dir={tmp_path / 'run'}",
                            cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "nothing written" in proc.stdout and list(tmp_path.iterdir()) == []


def test_dp_takes_its_share_of_the_global_batch(compose_config):
    from longtrain.run_config import load_config

    cfg = load_config(compose_config("preset=cpu_demo", "stage=cpu/pretrain", "parallel.dp=2"))
    assert (cfg.stage.global_batch_size, cfg.stage.micro_batch_size) == (8, 4)  # the recipe's batch, split
    one = load_config(compose_config("preset=cpu_demo", "stage=cpu/extend_8k"))
    assert (one.stage.global_batch_size, one.stage.micro_batch_size) == (1, 1)


@pytest.mark.e2e
@pytest.mark.parametrize("dp,cp", [(2, 1), (2, 2)])
def test_dp_launches_of_the_cpu_demo(tmp_path, dp, cp):
    args = [*QUICK, "stage.steps=2", "gate.min_recall=0", f"parallel.dp={dp}", f"parallel.cp={cp}", f"run.dir={tmp_path}"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={dp * cp}",
                           TRAIN, *args], cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"dp=2 cp={cp}" in proc.stdout and read_gate(tmp_path / "induction").passed


@pytest.mark.e2e
def test_a_frozen_rank_ends_the_job_naming_it(tmp_path):
    args = [*QUICK, "stage.steps=400", "parallel.cp=2", "parallel.timeout_s=5", f"run.dir={tmp_path}"]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN,
                             *args], cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path / "induction" / "metrics.jsonl", 1, proc)
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()]
    rank1 = next(p for p in workers if b"RANK=1\0" in Path(f"/proc/{p}/environ").read_bytes())
    os.kill(rank1, signal.SIGSTOP)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("parallel error:"):
                break  # rank 0 named it; torchrun would now wait out its grace period on a stopped process
    finally:
        with contextlib.suppress(ProcessLookupError):  # torchrun may have killed it already
            os.kill(rank1, signal.SIGKILL)
    _, rest = proc.communicate(timeout=120)
    err = "".join(seen) + rest
    assert proc.returncode != 0
    assert "parallel error: a collective waited more than parallel.timeout_s=5 s: rank(s) 1 did not answer" in err


@pytest.mark.e2e
def test_slurm_script_forwards_the_stop_signal_and_requeues(tmp_path):
    """launch/slurm.sbatch under stand-ins for srun and scontrol: USR1 before the time limit
    reaches the trainer through torchrun, which checkpoints; the script then requeues."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nshift\nexec "$@"\n')  # drop --kill-on-bad-exit=1
    (bin_dir / "scontrol").write_text(
        f'#!/bin/bash\nif [ "$1" = show ]; then echo localhost; else echo "$@" > {tmp_path}/requeued; fi\n'
    )
    (bin_dir / "torchrun").write_text(f'#!/bin/bash\nexec {sys.executable} -m torch.distributed.run "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    slurm_env = {**env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "localhost",
                 "SLURM_NNODES": "1", "SLURM_JOB_ID": "7", "GPUS_PER_NODE": "1"}
    script = Path(TRAIN).parent / "launch" / "slurm.sbatch"
    proc = subprocess.Popen(["bash", str(script), *STOPPABLE, "stage.steps=400", f"run.dir={tmp_path / 'run'}"],
                            cwd=Path(TRAIN).parent, env=slurm_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for_step(tmp_path / "run" / "induction" / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "7"]
    assert "preempted: SIGTERM at step" in err
    assert ckpt.latest_checkpoint(tmp_path / "run" / "induction" / "checkpoints") is not None


@pytest.mark.e2e  # the README's sweep command, composed as a whole
def test_readme_sweep_command_validates(tmp_path):
    """`python train.py -m optim.lr=1e-3,3e-3`: one plan per job, each in its own folder."""
    proc = train_in_process("-m", "optim.lr=1e-3,3e-3", "run.dry_run=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("nothing written") == 2
    assert "multirun/" in proc.stdout and "/0/pretrain" in proc.stdout and "/1/pretrain" in proc.stdout
