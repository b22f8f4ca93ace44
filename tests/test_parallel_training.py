"""Context parallelism + FSDP2 in the real trainer, on gloo CPU ranks, against one rank.

One training step at cp=2 and at dp=2·cp=2 gives the loss and parameter gradients of the
single-rank run; 20 steps track its losses; checkpoints saved at one layout resume at
another (cp=2→cp=1, dp=1·cp=2→dp=2·cp=1, world 1→2) and continue on the same losses;
the evaluators' sharded scores (per-token loss, argmax) equal the single rank's over the whole sequence.
"""

from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from longtrain.parallel.mesh import init_parallel
from longtrain.run_config import load_config
from longtrain.trainer.builder import build_trainer, run_stage
from longtrain.trainer.trainer import Trainer
from tests.dist_utils import run_distributed
from tests.test_trainer import TINY, losses, single_process

# Its module-scoped fixture is built once: every test of the module runs on one xdist worker.
pytestmark = pytest.mark.xdist_group("parallel_training")

STEPS = ["stage.steps=20", "run.checkpoint_every=10", "eval.val_every=0", "run.keep_checkpoints=2"]
# Positions past a 16-token pretraining length: each shard scales its own queries (logn).
ROPE = ["rope=abf", "rope.original_max_position_embeddings=16", "rope.logn_attention=true"]


def make_config(run_dir: Path, dp: int = 1, cp: int = 1, resume: str = "none", extra: tuple[str, ...] = ()):
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONFIG_DIR

    overrides = [*TINY, *STEPS, *ROPE, f"run.dir={run_dir}", f"parallel.dp={dp}", f"parallel.cp={cp}", f"run.resume={resume}", *extra]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return load_config(compose(config_name="config", overrides=overrides))


def first_step_grads(trainer: Trainer) -> tuple[float, dict[str, torch.Tensor]]:
    sums = trainer.forward_backward(trainer.loader.next_batch())
    grads = {}
    for name, p in trainer.model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name] = g.detach().clone()
    return float(sums["ce"] / sums["tokens"]), grads


def whole_sequence_scores(trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluators' scores (needle grid, loss by position) of every token of a fixed batch."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, trainer.cfg.stage.seq_len), generator=g)
    labels = torch.randint(0, 256, ids.shape, generator=g)
    return tuple(trainer.evaluator.score_fn()(ids, torch.arange(ids.shape[1]).expand(2, -1), labels))


def _layout_worker(rank: int, world_size: int, tmp: str, dp: int, cp: int, resume_from: str) -> None:
    tmp = Path(tmp)
    cfg = make_config(tmp / f"dp{dp}cp{cp}", dp, cp)
    pd = init_parallel(cfg.parallel, torch.device("cpu"))
    trainer = build_trainer(cfg, pd)
    scores = whole_sequence_scores(trainer)
    loss, grads = first_step_grads(trainer)
    if rank == 0:
        torch.save({"loss": loss, "grads": grads, "scores": scores}, tmp / f"grads_dp{dp}cp{cp}.pt")
    run_stage(cfg, pd)  # 20 steps straight, checkpoints at 10 and 20
    if resume_from:  # a checkpoint written at another layout, resumed at this one
        cfg = make_config(tmp / f"dp{dp}cp{cp}_resumed", dp, cp, resume=resume_from)
        run_stage(cfg, pd)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layouts")
    ref_cfg = make_config(tmp / "dp1cp1")
    ref_trainer = build_trainer(ref_cfg, single_process())
    scores = whole_sequence_scores(ref_trainer)
    loss, grads = first_step_grads(ref_trainer)
    run_stage(ref_cfg, single_process())
    ckpt10 = lambda name: str(tmp / name / "pretrain" / "checkpoints" / "step_00000010")  # noqa: E731
    run_distributed(_layout_worker, 2, str(tmp), 1, 2, ckpt10("dp1cp1"), timeout=240)  # world 1 → 2
    run_distributed(_layout_worker, 4, str(tmp), 2, 2, "", timeout=240)
    run_distributed(_layout_worker, 2, str(tmp), 2, 1, ckpt10("dp1cp2"), timeout=240)  # dp1·cp2 → dp2·cp1
    run_stage(make_config(tmp / "dp1cp1_from_cp2", resume=ckpt10("dp1cp2")), single_process())  # cp2 → cp1
    return tmp, {"loss": loss, "grads": grads, "scores": scores}


# The layout runs (20 steps at four layouts on spawned gloo ranks, resumed across layouts)
# are the slowest fixture of the suite: the e2e tier's, like the resume of a real process.
LAYOUT_RUNS = pytest.mark.e2e


def stage_losses(tmp: Path, name: str) -> dict[int, float]:
    return losses(tmp / name / "pretrain")


@LAYOUT_RUNS
@pytest.mark.parametrize("layout", ["dp1cp2", "dp2cp2", "dp2cp1"])
def test_one_step_matches_single_rank(runs, layout):
    tmp, ref = runs
    got = torch.load(tmp / f"grads_{layout}.pt")
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert got["grads"].keys() == ref["grads"].keys()
    for name, g in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-5, atol=1e-5 * g.abs().max().item(), msg=name)


@LAYOUT_RUNS
@pytest.mark.parametrize("layout", ["dp1cp2", "dp2cp2"])
def test_sharded_evaluation_forward_matches_single_rank(runs, layout):
    """Needle recall and loss by position at cp > 1 see the whole sequence's per-token loss and argmax."""
    tmp, ref = runs
    (loss, argmax), (ref_loss, ref_argmax) = torch.load(tmp / f"grads_{layout}.pt")["scores"], ref["scores"]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(argmax, ref_argmax)


@LAYOUT_RUNS
@pytest.mark.parametrize("layout", ["dp1cp2", "dp2cp2", "dp2cp1"])
def test_twenty_steps_track_single_rank(runs, layout):
    tmp, _ = runs
    ref, got = stage_losses(tmp, "dp1cp1"), stage_losses(tmp, layout)
    assert sorted(got) == list(range(1, 21))
    for step in range(1, 21):
        assert got[step] == pytest.approx(ref[step], abs=1e-4), step


@LAYOUT_RUNS
@pytest.mark.parametrize(
    "resumed,source",
    [("dp1cp2_resumed", "world 1 -> 2"), ("dp2cp1_resumed", "dp1·cp2 -> dp2·cp1"), ("dp1cp1_from_cp2", "cp2 -> cp1")],
)
def test_checkpoint_loads_at_another_layout(runs, resumed, source):
    tmp, _ = runs
    ref, got = stage_losses(tmp, "dp1cp1"), stage_losses(tmp, resumed)
    assert sorted(got) == list(range(11, 21)), source
    for step in range(11, 21):
        assert got[step] == pytest.approx(ref[step], abs=1e-4), (source, step)


def _masking(tmp: Path) -> tuple[str, ...]:
    """Document masking with per-document positions on a corpus of 5..60-byte documents,
    so every 64-token window holds several boundaries."""
    return ("data.document_masking=true", "data.reset_positions=true", "data=local", f"data.path={tmp}/short/*.txt",
            "data.val_percent=20", f"data.prepared={tmp}/short_prepared")


def first_step_without_gathers(trainer: Trainer) -> tuple[float, dict[str, torch.Tensor]]:
    """``first_step_grads``, checking that attention gathered no doc ids: it used the
    micro-batch's layout, planned on the host."""
    gathers = []
    with mock.patch.object(dist, "all_gather", side_effect=lambda *a, **k: gathers.append(a)):
        result = first_step_grads(trainer)
    assert gathers == []
    return result


def _masked_step_worker(rank: int, world_size: int, tmp: str) -> None:
    cfg = make_config(Path(tmp) / "masked_cp2", cp=2, extra=_masking(Path(tmp)))
    loss, grads = first_step_without_gathers(build_trainer(cfg, init_parallel(cfg.parallel, torch.device("cpu"))))
    if rank == 0:
        torch.save({"loss": loss, "grads": grads}, Path(tmp) / "masked_cp2.pt")


@pytest.mark.timeout(300)
@pytest.mark.e2e
def test_document_masking_step_at_cp2_matches_single_rank(tmp_path):
    rng = torch.Generator().manual_seed(0)
    (tmp_path / "short").mkdir()
    for i in range(300):
        n = int(torch.randint(5, 60, (1,), generator=rng))
        (tmp_path / "short" / f"{i:03d}.txt").write_text("".join(chr(97 + (i * 7 + j) % 26) for j in range(n)))
    run_distributed(_masked_step_worker, 2, str(tmp_path), timeout=240)
    got = torch.load(tmp_path / "masked_cp2.pt")
    trainer = build_trainer(make_config(tmp_path / "masked_cp1", extra=_masking(tmp_path)), single_process())
    batch = trainer.loader.next_batch()
    assert all(int(mb["doc_ids"].max()) >= 2 for mb in batch)  # boundaries inside every sample
    trainer.loader.samples_consumed = 0
    loss, grads = first_step_grads(trainer)
    assert got["loss"] == pytest.approx(loss, rel=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-5, atol=1e-5 * g.abs().max().item(), msg=name)
    trainer.cfg.data.document_masking = False  # and masking is what these losses measured
    trainer.loader.samples_consumed = 0
    assert first_step_grads(trainer)[0] != pytest.approx(loss, rel=1e-5)  # beyond the cp agreement above
