"""Checkpoints carry checksums; a damaged one is never loaded, resume falls back past it,
retention prunes only this run's checkpoints, and non-finite weights are never saved."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from longtrain import checkpoint as ckpt
from longtrain.run_config import load_config
from longtrain.trainer.builder import build_trainer, prepare_trainer
from longtrain.trainer.checkpointer import Diverged
from tests.test_trainer import TINY, single_process


def trained(compose_config, run_dir, steps=3, *extra):
    """A trainer with a checkpoint after each of ``steps`` steps."""
    cfg = load_config(compose_config(*TINY, f"run.dir={run_dir}", "run.keep_checkpoints=5", *extra))
    trainer = build_trainer(cfg, single_process())
    for _ in range(steps):
        trainer.train_step()
        trainer.save()
    return trainer


def corrupt(path, how):
    shard = next(path.glob("__0_*.distcp"))
    if how == "truncated shard":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif how == "deleted shard":
        shard.unlink()
    elif how == "deleted trainer state":
        (path / ckpt.TRAINER_STATE).unlink()
    elif how == "overwritten 4 KB":
        with shard.open("r+b") as f:  # same size, different bytes: only the hash sees it
            f.seek(shard.stat().st_size // 3)
            f.write(b"\0" * 4096)
    elif how == "checksums unreadable":
        (path / ckpt.CHECKSUMS).write_text("{not json")


@pytest.mark.parametrize(
    "how", ["truncated shard", "deleted shard", "deleted trainer state", "overwritten 4 KB", "checksums unreadable"]
)
def test_resume_falls_back_past_a_damaged_checkpoint(compose_config, tmp_path, capsys, how):
    trainer = trained(compose_config, tmp_path)
    newest = trainer.checkpointer.folder / "step_00000003"
    corrupt(newest, how)
    assert ckpt.verify_checkpoint(newest) is not None
    capsys.readouterr()

    cfg = load_config(compose_config(*TINY, f"run.dir={tmp_path}", "run.resume=auto"))
    resumed = prepare_trainer(cfg, single_process())
    assert resumed.step == 2  # the newest checkpoint that passes
    out = [line for line in capsys.readouterr().out.splitlines() if "skipping" in line]
    assert len(out) == 1 and str(newest) in out[0]
    with pytest.raises(ckpt.CheckpointError, match="step_00000003"):
        ckpt.load_checkpoint(newest, resumed.model)  # never loaded, even asked for directly


def test_weights_from_a_damaged_checkpoint_are_refused(compose_config, tmp_path):
    trainer = trained(compose_config, tmp_path, 1)
    corrupt(trainer.checkpointer.folder / "step_00000001", "overwritten 4 KB")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(ckpt.CheckpointError, match="fails its SHA-256 checksum"):
        trainer.checkpointer.load_weights(trainer.checkpointer.folder / "step_00000001")
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_retention_prunes_only_this_runs_checkpoints(compose_config, tmp_path):
    # An earlier run left step 100 in the folder (e.g. a copy); this run must neither prune
    # its own new checkpoints because 100 sorts after them, nor delete the other run's.
    other = trained(compose_config, tmp_path / "other", 1)
    root = tmp_path / "run" / "pretrain" / "checkpoints"
    root.mkdir(parents=True)
    shutil.copytree(other.checkpointer.folder / "step_00000001", root / "step_00000100")
    cfg = load_config(compose_config(*TINY, f"run.dir={tmp_path / 'run'}", "run.keep_checkpoints=2", "run.id=second"))
    trainer = build_trainer(cfg, single_process())
    for _ in range(3):
        trainer.train_step()
        trainer.save()
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000003", "step_00000100"]
    assert json.loads((root / "step_00000003" / ckpt.CHECKSUMS).read_text())["run_id"] == "second"


def test_non_finite_steps_are_skipped_then_stop(compose_config, tmp_path):
    cfg = load_config(compose_config(*TINY, f"run.dir={tmp_path}", "optim.max_nonfinite_steps=3"))
    trainer = build_trainer(cfg, single_process())
    trainer.train_step()
    trainer.save()
    good = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with torch.no_grad():  # a poisoned weight: every later loss is NaN
        trainer.model.norm.weight[0] = float("nan")
    for _ in range(2):
        metrics = trainer.train_step()
        assert metrics["skipped"] == 1 and trainer.step == 1  # neither weights nor schedule moved
    assert trainer.scheduler.last_epoch == 1
    with pytest.raises(Diverged, match=r"3 steps in a row .* last good checkpoint: .*step_00000001"):
        trainer.train_step()
    with pytest.raises(Diverged, match="not finite"):
        trainer.save()  # never saved
    assert [p.name for p in ckpt.complete_checkpoints(trainer.checkpointer.folder)] == ["step_00000001"]
    loaded = build_trainer(cfg, single_process())
    loaded.checkpointer.load_weights(trainer.checkpointer.folder / "step_00000001")
    assert all(torch.equal(good[k], v) for k, v in loaded.model.state_dict().items())
