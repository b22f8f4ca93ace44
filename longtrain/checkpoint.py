"""Distributed checkpoints on disk: atomic, checksummed, loadable at another parallel layout.

Model and optimizer go through ``torch.distributed.checkpoint`` (DCP), which stores each
tensor once with its global shape, so a checkpoint written by FSDP2 shards over dp×cp
ranks loads into any other layout. The trainer's own state (step, schedule, data
position, RNG) is small and written by rank 0 beside it. Everything is written into
``step_XXXXXXXX.tmp`` and renamed when complete, so a crash mid-save never leaves a
folder that ``latest_checkpoint`` would pick. ``checksums.json`` records every file's size
and SHA-256 (and the run that wrote it): a checkpoint that fails them is never loaded, and
resuming falls back to the newest one that passes. When to save, which to keep and which
to resume from is the trainer's checkpointer (``trainer/checkpointer.py``).
"""

from __future__ import annotations

import hashlib
import json
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
CHECKSUMS = "checksums.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which and why, in one line."""

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
    """A renamed ``step_*`` folder with its checksums (written last): a save that finished."""
    return _STEP_DIR.match(path.name) is not None and (path / CHECKSUMS).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete ``step_*`` folders under root, oldest first (``.tmp`` folders never are)."""
    return sorted(p for p in root.iterdir() if is_complete(p)) if root.is_dir() else []


def latest_checkpoint(root: Path) -> Optional[Path]:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _my_share(names: list[str]) -> list[str]:
    """Files this rank hashes: ranks split the work (every rank reads only 1/world of it)."""
    if not dist.is_initialized():
        return names
    return names[dist.get_rank() :: dist.get_world_size()]


def _gather(items: list[Any]) -> list[Any]:
    if not dist.is_initialized():
        return items
    out: list[list[Any]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def _digests(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    mine = [(n, (folder / n).stat().st_size, _sha256(folder / n)) for n in _my_share(names)]
    return {n: {"size": size, "sha256": digest} for n, size, digest in _gather(mine)}


def read_checksums(path: Path) -> dict[str, Any]:
    return json.loads((path / CHECKSUMS).read_text())


def verify_checkpoint(path: Path) -> Optional[str]:
    """None if every file matches its recorded size and SHA-256, else why not (one line).

    Sizes are checked first (cheap: a truncated or deleted file); hashing is split over the
    ranks, and every rank gets the same answer.
    """
    try:
        files = read_checksums(path)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable {CHECKSUMS} ({type(e).__name__})"
    for name, want in sorted(files.items()):
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["size"]:
            return f"{name} has {f.stat().st_size} bytes, {want['size']} were written"
    bad = sorted(n for n, d in _digests(path, sorted(files)).items() if d["sha256"] != files[n]["sha256"])
    return f"{bad[0]} fails its SHA-256 checksum (corrupted after it was written)" if bad else None


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    run_id: str,
) -> Path:
    """Write model + optimizer (sharded), trainer state and checksums, recording ``run_id``
    as the checkpoint's owner."""
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
    barrier()
    files = _digests(tmp, sorted(p.name for p in tmp.iterdir()))
    if _is_rank0():
        # Written last: a folder with checksums is complete.
        (tmp / CHECKSUMS).write_text(json.dumps({"run_id": run_id, "step": step, "files": files}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    barrier()
    return final


def owner(path: Path) -> Optional[str]:
    """The run id that wrote a checkpoint (None: unreadable checksums)."""
    try:
        return read_checksums(path).get("run_id")
    except (OSError, ValueError):
        return None


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None
) -> dict[str, Any]:
    """Load model (and optimizer, if given) into the current layout; return trainer state.

    With ``optimizer=None`` only the weights are loaded: that is how a new curriculum
    stage starts from the previous stage's checkpoint. A checkpoint that is incomplete or
    fails its checksums raises :class:`CheckpointError` before anything is loaded.
    """
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (no {CHECKSUMS}: a step_XXXXXXXX folder that finished saving)")
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
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

