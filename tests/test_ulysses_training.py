"""parallel.cp_method in the config and the trainer: one-line errors before any compute,
the Ulysses and ring groups of each cp group, a cp=2 step with Ulysses and a cp=4 step
with the 2×2 hybrid (document masking on, planned on the host) equal to the ring's, and a
checkpoint of one method resuming under the other."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from longtrain.config import ConfigError
from longtrain.parallel.mesh import ParallelDims, hybrid_group_ranks, init_parallel
from longtrain.run_config import load_config
from longtrain.trainer.builder import build_trainer, run_stage
from tests.cli_utils import train_in_process
from tests.dist_utils import run_distributed
from tests.test_parallel_training import _masking, first_step_without_gathers, make_config
from tests.test_trainer import losses


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["parallel.cp_method=star"], "parallel.cp_method: unknown value 'star'; valid: ring, ulysses, hybrid"),
        (["parallel.cp=4", "parallel.cp_method=hybrid"], "parallel.ulysses: parallel.cp_method=hybrid needs a Ulysses degree"),
        (["parallel.cp=4", "parallel.cp_method=hybrid", "parallel.ulysses=3"], "parallel.ulysses: .*divides parallel.cp=4, got 3"),
        (["parallel.cp=4", "parallel.ulysses=2"], "parallel.ulysses: is only for parallel.cp_method=hybrid"),
        # 125m: 12 heads, 4 KV heads.
        (["parallel.cp=8", "parallel.cp_method=ulysses"], r"parallel.cp: Ulysses degree 8 \(ulysses\) must divide model.n_heads=12"),
        (["parallel.cp=6", "parallel.cp_method=ulysses"], r"parallel.cp: .* model.n_kv_heads=4"),
        (["parallel.cp=8", "parallel.cp_method=hybrid", "parallel.ulysses=8"], "parallel.ulysses: Ulysses degree 8"),
    ],
)
def test_bad_method_or_degree_is_one_line(compose_config, overrides, message):
    with pytest.raises(ConfigError, match="^" + message) as err:
        load_config(compose_config("stage=pretrain", *overrides))
    assert "\n" not in str(err.value)


def test_heads_rule_stops_the_cli_before_compute(tmp_path):
    proc = train_in_process("parallel.cp=8", "parallel.cp_method=ulysses", f"run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        "config error: parallel.cp: Ulysses degree 8 (ulysses) must divide model.n_heads=12"
    ]
    assert not (tmp_path / "run").exists()


def test_ring_place_of_each_method():
    """(ring_rank, ring_size) of cp ranks 0..7: what the evaluator plans documents for."""
    cpu = torch.device("cpu")
    place = lambda method, u: [  # noqa: E731
        (d.ring_rank, d.ring_size) for d in (ParallelDims(1, 8, r, 8, cpu, cp_method=method, ulysses=u) for r in range(8))
    ]
    assert place("ring", 1) == [(r, 8) for r in range(8)]
    assert place("ulysses", 8) == [(0, 1)] * 8
    assert place("hybrid", 2) == [(r // 2, 4) for r in range(8)]
    with pytest.raises(ConfigError, match="^parallel.ulysses: the Ulysses degree 3 must divide parallel.cp=8$"):
        ParallelDims(1, 8, 0, 8, cpu, cp_method="hybrid", ulysses=3)


def test_hybrid_groups_of_a_dp2_cp4_mesh():
    """rank = dp_rank·cp + cp_rank and cp rank p = j·U + u: Ulysses over each j, the ring over each u."""
    dims = ParallelDims(2, 4, 0, 8, torch.device("cpu"), cp_method="hybrid", ulysses=2)
    assert hybrid_group_ranks(dims) == ([[0, 1], [2, 3], [4, 5], [6, 7]], [[0, 2], [1, 3], [4, 6], [5, 7]])


def _write_short_documents(tmp: Path) -> None:
    """test_parallel_training's corpus for masking: several documents in every window."""
    rng = torch.Generator().manual_seed(0)
    (tmp / "short").mkdir()
    for i in range(300):
        n = int(torch.randint(5, 60, (1,), generator=rng))
        (tmp / "short" / f"{i:03d}.txt").write_text("".join(chr(97 + (i * 7 + j) % 26) for j in range(n)))


def _assert_same_step(got, want) -> None:
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5 * g.abs().max().item(), msg=name)


SHORT = ("stage.steps=2", "run.checkpoint_every=1")


def _step_worker(rank: int, world_size: int, tmp: str) -> None:
    tmp = Path(tmp)
    results = {}
    for method in ("ring", "ulysses"):
        cfg = make_config(tmp / method, cp=2, extra=(*_masking(tmp), *SHORT, f"parallel.cp_method={method}"))
        results[method] = first_step_without_gathers(build_trainer(cfg, init_parallel(cfg.parallel, torch.device("cpu"))))
    # Two steps under the ring, then the ring's step-1 checkpoint resumed under Ulysses.
    cfg = make_config(tmp / "ring_run", cp=2, extra=(*_masking(tmp), *SHORT))
    pd = init_parallel(cfg.parallel, torch.device("cpu"))
    run_stage(cfg, pd)
    step1 = tmp / "ring_run" / "pretrain" / "checkpoints" / "step_00000001"
    extra = (*_masking(tmp), *SHORT, "parallel.cp_method=ulysses")
    run_stage(make_config(tmp / "ulysses_resumed", cp=2, resume=str(step1), extra=extra), pd)
    if rank == 0:
        torch.save(results, tmp / "steps.pt")


def _step_matches_ring(tmp_path: Path, worker, world_size: int, method: str) -> None:
    """``worker``'s first step under ``method`` equals the ring's (loss and gradients)."""
    _write_short_documents(tmp_path)
    run_distributed(worker, world_size, str(tmp_path), timeout=280)
    results = torch.load(tmp_path / "steps.pt")
    _assert_same_step(results[method], results["ring"])


@pytest.mark.timeout(300)
@pytest.mark.e2e
def test_ulysses_step_matches_ring_and_resumes_its_checkpoint(tmp_path):
    _step_matches_ring(tmp_path, _step_worker, 2, "ulysses")
    ring, resumed = losses(tmp_path / "ring_run" / "pretrain"), losses(tmp_path / "ulysses_resumed" / "pretrain")
    assert sorted(resumed) == [2] and resumed[2] == pytest.approx(ring[2], rel=1e-5)


def _hybrid_step_worker(rank: int, world_size: int, tmp: str) -> None:
    tmp = Path(tmp)
    results = {}
    for method in ("ring", "hybrid"):
        extra = (*_masking(tmp), *SHORT, f"parallel.cp_method={method}", *(["parallel.ulysses=2"] if method == "hybrid" else []))
        cfg = make_config(tmp / method, cp=4, extra=extra)
        pd = init_parallel(cfg.parallel, torch.device("cpu"))
        if method == "hybrid":  # the groups init_parallel built, and the ring place the evaluator plans for
            assert dist.get_process_group_ranks(pd.ulysses_group) == hybrid_group_ranks(pd)[0][rank // 2]
            assert dist.get_process_group_ranks(pd.ring_group) == hybrid_group_ranks(pd)[1][rank % 2]
            assert (pd.ring_rank, pd.ring_size) == (dist.get_rank(pd.ring_group), 2)
        results[method] = first_step_without_gathers(build_trainer(cfg, pd))
    if rank == 0:
        torch.save(results, tmp / "steps.pt")


@pytest.mark.timeout(300)
@pytest.mark.e2e
def test_hybrid_step_matches_ring(tmp_path):
    _step_matches_ring(tmp_path, _hybrid_step_worker, 4, "hybrid")
