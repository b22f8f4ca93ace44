"""The trainer end to end on a tiny config: it learns, checkpoints, and resumes exactly."""

import json
from pathlib import Path

import pytest

from longtrain import checkpoint as ckpt
from longtrain.parallel.mesh import ParallelDims
from longtrain.run_config import load_config
from longtrain.trainer.builder import build_trainer, run_stage

import torch

TINY = [
    "preset=cpu_demo", "stage=cpu/pretrain",
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "stage.seq_len=64", "stage.steps=8", "stage.global_batch_size=4", "stage.micro_batch_size=2",
    "stage.warmup_steps=2", "stage.retrieval_share=0", "data.max_docs=40", "logging.log_every=1", "logging.progress=false",
    "eval.val_every=4", "eval.val_batches=2", "run.checkpoint_every=4",
]


def single_process() -> ParallelDims:
    return ParallelDims(dp=1, cp=1, rank=0, world_size=1, device=torch.device("cpu"))


def losses(stage_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_resume_matches_uninterrupted_run(compose_config, tmp_path):
    straight = load_config(compose_config(*TINY, f"run.dir={tmp_path / 'straight'}"))
    result = run_stage(straight, single_process())
    assert result.step == 8 and ckpt.is_complete(result.checkpoint)
    expected = losses(result.stage_dir)

    # The interrupted run: 4 steps, a checkpoint, then the process "dies".
    cfg = load_config(compose_config(*TINY, f"run.dir={tmp_path / 'resumed'}"))
    first = build_trainer(cfg, single_process())
    for _ in range(4):
        first.train_step()
    first.save()
    del first
    resumed_cfg = load_config(compose_config(*TINY, f"run.dir={tmp_path / 'resumed'}", "run.resume=auto"))
    result = run_stage(resumed_cfg, single_process())
    got = losses(result.stage_dir)
    assert sorted(got) == [5, 6, 7, 8]
    assert [got[s] for s in range(5, 9)] == [expected[s] for s in range(5, 9)]  # exact on CPU


def test_checkpoint_is_atomic_and_retained(compose_config, tmp_path):
    cfg = load_config(compose_config(*TINY, f"run.dir={tmp_path}", "run.keep_checkpoints=2"))
    trainer = build_trainer(cfg, single_process())
    for step in range(1, 4):
        trainer.train_step()
        trainer.save()
    root = trainer.checkpointer.folder
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000003"]
    # A half-written checkpoint (crash during save) is never picked for resume.
    (root / "step_00000009.tmp").mkdir()
    (root / "step_00000010").mkdir()  # no metadata: incomplete
    assert ckpt.latest_checkpoint(root).name == "step_00000003"
    state = torch.load(root / "step_00000003" / ckpt.TRAINER_STATE, weights_only=False)
    assert state["step"] == 3 and state["loader"] == {"samples_consumed": 12}
    assert "seq_len: 64" in state["config"]


@pytest.mark.e2e
def test_validation_loss_falls(compose_config, tmp_path):
    cfg = load_config(
        compose_config(*TINY, f"run.dir={tmp_path}", "stage.steps=60", "eval.val_every=60", "optim.lr=3e-3")
    )
    trainer = build_trainer(cfg, single_process())
    start = trainer.evaluator.validate()
    result = trainer.fit()
    assert result.val_loss < 0.7 * start
