"""A rank that stops answering is named in one line, during training and while rank 0
prepares data, on gloo ranks in this machine; and the NCCL settings that make NCCL's
timeouts reach the same code (docs/operations.md, "Hung ranks").

The silent rank is one that sleeps instead of joining: rank 0 must name it within the
timeouts, and the wait for rank 0's data preparation must outlast ``parallel.timeout_s``.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from longtrain import cli
from longtrain.config import Config
from longtrain.data import shards
from longtrain.parallel.mesh import CollectiveTimeout, ParallelDims, collective_timeouts, is_peer_failure, wait_for_rank0
from tests.dist_utils import run_distributed

TIMEOUT_S = 1  # parallel.timeout_s of these runs
SILENCE_S = 8  # how long the silent rank sleeps: longer than every timeout rank 0 meets


def dims(rank: int) -> ParallelDims:
    health = dist.new_group(backend="gloo")
    return ParallelDims(2, 1, rank, 2, torch.device("cpu"), health_group=health, timeout_s=TIMEOUT_S)


def outcome(fn) -> str:
    """'ok', or the line of the CollectiveTimeout ``fn`` raised."""
    try:
        fn()
    except CollectiveTimeout as e:
        return str(e)
    return "ok"


def _training_worker(rank: int, world_size: int, out: str) -> None:
    pd, pd2 = dims(rank), dims(rank)  # gloo closes a pair that timed out: one health group per case
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=TIMEOUT_S))  # the training group
    if rank == 1:
        time.sleep(SILENCE_S)  # stops answering mid-training
        return

    def gloo_timeout() -> None:
        with collective_timeouts(pd):
            dist.all_reduce(torch.ones(1), group=group)

    def nccl_error() -> None:  # what NCCL's blocking wait raises after the group's timeout
        with collective_timeouts(pd2):
            raise dist.DistBackendError("[Rank 0] Work WorkNCCL(SeqNum=7, OpType=ALLREDUCE) timed out in blocking wait")

    lines = [outcome(gloo_timeout), outcome(nccl_error)]
    Path(out).write_text("\n".join(lines))


def _fake_preparation(folder: Path, seconds: float):
    def prepare(data, tokenizer, target, **kwargs) -> None:
        time.sleep(seconds)  # rank 0 prepares for longer than parallel.timeout_s
        target.mkdir(parents=True, exist_ok=True)
        (target / "manifest.json").write_text("{}")

    shards.prepare = prepare
    shards.prepared_dir = lambda data, tokenizer: folder
    shards.PreparedData = lambda folder, tokenizer: folder


def _preparation_worker(rank: int, world_size: int, tmp: str, rank1_silent: bool) -> None:
    pd = dims(rank)
    _fake_preparation(Path(tmp) / "prepared", seconds=TIMEOUT_S if rank1_silent else 3 * TIMEOUT_S)
    if rank == 1 and rank1_silent:
        time.sleep(SILENCE_S)  # stops answering while rank 0 prepares
        return

    def open_data() -> None:
        wait = lambda: wait_for_rank0(pd, wait_s=30)  # noqa: E731
        assert shards.open_prepared(Config(), pd.is_rank0, wait) == Path(tmp) / "prepared"

    Path(tmp, f"rank{rank}.txt").write_text(outcome(open_data))


@pytest.mark.e2e
def test_a_silent_rank_is_named_during_training_on_gloo_and_on_nccl_errors(tmp_path):
    out = tmp_path / "rank0.txt"
    run_distributed(_training_worker, 2, str(out), timeout=60)
    gloo, nccl = out.read_text().split("\n")
    expected = f"a collective waited more than parallel.timeout_s={TIMEOUT_S} s: rank(s) 1 did not answer (hung or dead); stopping the job"
    assert gloo == expected
    assert nccl == expected


@pytest.mark.e2e
def test_rank0_may_prepare_data_longer_than_the_collective_timeout(tmp_path):
    run_distributed(_preparation_worker, 2, str(tmp_path), False, timeout=60)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["ok", "ok"]


@pytest.mark.e2e
def test_a_rank_silent_while_rank0_prepares_data_is_named(tmp_path):
    run_distributed(_preparation_worker, 2, str(tmp_path), True, timeout=60)
    line = (tmp_path / "rank0.txt").read_text()
    assert line.startswith("the ranks' meeting after rank 0 prepared the data timed out (parallel.prepare_timeout_s=30 s")
    assert line.endswith(": rank(s) 1 did not answer (hung or dead); stopping the job") and "\n" not in line


def test_the_command_sets_nccl_blocking_wait_unless_the_operator_did(monkeypatch):
    monkeypatch.setenv("TORCH_NCCL_BLOCKING_WAIT", "")  # so that teardown restores what was there
    monkeypatch.delenv("TORCH_NCCL_BLOCKING_WAIT")
    cli.set_nccl_environment()
    assert issubclass(dist.DistBackendError, RuntimeError)  # what collective_timeouts catches
    assert os.environ["TORCH_NCCL_BLOCKING_WAIT"] == "1"
    monkeypatch.setenv("TORCH_NCCL_BLOCKING_WAIT", "0")
    cli.set_nccl_environment()
    assert os.environ["TORCH_NCCL_BLOCKING_WAIT"] == "0"


@pytest.mark.parametrize("error,named", [
    (dist.DistBackendError("NCCL communicator was aborted on rank 1"), True),
    (RuntimeError("[../gloo/transport/tcp/pair.cc:534] Timed out waiting 1000ms for recv operation"), True),
    (RuntimeError("shape mismatch"), False),
])
def test_which_errors_are_a_peers_fault(error, named):
    assert is_peer_failure(error) is named


class _ProcessGroupWouldStart(Exception):
    pass


def test_train_py_sets_blocking_wait_before_the_process_group_on_cuda(tmp_path, monkeypatch):
    """Through the command on a (faked) H100: the variable is in the environment when
    init_parallel creates the NCCL group."""
    from tests.cli_utils import train_in_process
    from tests.test_hardware import fake_gpu

    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", 9, 0, "none")
    monkeypatch.setenv("TORCH_NCCL_BLOCKING_WAIT", "")  # so that teardown restores what was there
    monkeypatch.delenv("TORCH_NCCL_BLOCKING_WAIT")
    seen = []

    def init_parallel(cfg, device):
        seen.append((device.type, os.environ.get("TORCH_NCCL_BLOCKING_WAIT")))
        raise _ProcessGroupWouldStart

    monkeypatch.setattr(cli, "init_parallel", init_parallel)
    with pytest.raises(_ProcessGroupWouldStart):
        train_in_process("run.device=cuda", f"run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert seen == [("cuda", "1")]
