"""Distributed checkpoints: atomic, with retention, loadable at another parallel layout.

Model and optimizer go through ``torch.distributed.checkpoint`` (DCP), which stores each
tensor once with its global shape, so a checkpoint written by FSDP2 shards over dp×cp
ranks loads into any other layout. The trainer's own state (step, schedule, data
position, RNG) is small and written by rank 0 beside it. Everything is written into
``step_XXXXXXXX.tmp`` and renamed when complete, so a crash mid-save never leaves a
folder that ``latest_checkpoint`` would pick.
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

TRAINER_STATE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d{8})$")

# DCP warns on every call that it runs without a process group; that is our single-process case.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return _STEP_DIR.match(path.name) is not None and (path / ".metadata").is_file() and (path / TRAINER_STATE).is_file()


def latest_checkpoint(root: Path) -> Optional[Path]:
    """Newest complete ``step_*`` folder under root (``.tmp`` folders are never complete)."""
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if is_complete(p))
    return done[-1] if done else None


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write model + optimizer (sharded) and trainer state; keep the newest ``keep``."""
    final = checkpoint_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if _is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    # RNG differs per rank; each rank stores its own (restored when the world size matches).
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(_rng_state(), tmp / f"rng_{rank}.pt")
    barrier()
    if _is_rank0():
        torch.save(trainer_state, tmp / TRAINER_STATE)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(p for p in root.iterdir() if is_complete(p))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None
) -> dict[str, Any]:
    """Load model (and optimizer, if given) into the current layout; return trainer state.

    With ``optimizer=None`` only the weights are loaded: that is how a new curriculum
    stage starts from the previous stage's checkpoint.
    """
    if optimizer is None:
        model_sd = get_model_state_dict(model)
        state = {"model": model_sd}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state["model"])
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return torch.load(path / TRAINER_STATE, weights_only=False)


def restore_rng(path: Path) -> bool:
    """Restore this rank's RNG state if the checkpoint has one for it."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    f = path / f"rng_{rank}.pt"
    if not f.is_file():
        return False
    state = torch.load(f, weights_only=False)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return True


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state

