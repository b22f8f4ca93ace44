"""The stage's checkpoints: when to save, what is saved, which to keep, what to resume from.

The files themselves (DCP shards, trainer state, RNG, checksums) are ``longtrain/checkpoint.py``'s;
this decides around them: a save every ``run.checkpoint_every`` steps and on the last or a
stopped step, never of non-finite weights; the newest ``run.keep_checkpoints`` of this run
kept (another run's never pruned); resuming from the newest checkpoint that passes its
checksums; a new stage starting from another stage's (or a Hugging Face folder's) weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from longtrain import checkpoint as ckpt
from longtrain.hf import hf_path, load_hf_weights
from longtrain.logging import MetricsLogger
from longtrain.model.transformer import Transformer
from longtrain.parallel.mesh import ParallelDims, all_reduce_sum


class Diverged(RuntimeError):
    """Training produced non-finite values it could not skip past; the message says where to go back to."""


class Checkpointer:
    def __init__(
        self, folder: Path, interval: int, keep: int, run_id: str, stage: str,
        model: Transformer, optimizer: torch.optim.Optimizer, dims: ParallelDims, logger: MetricsLogger,
    ):
        self.folder = folder
        self.interval, self.keep = interval, keep
        self.run_id, self.stage = run_id, stage
        self.model, self.optimizer = model, optimizer
        self.dims, self.logger = dims, logger
        self.resumed_step: Optional[int] = None

    def save(self, step: int, trainer_state: Callable[[], dict[str, Any]], last_step: bool = False) -> Optional[Path]:
        """Save at an interval step, or at any step when ``last_step`` (the end, a stop);
        None when this step is not one to save."""
        if step % self.interval != 0 and not last_step:
            return None
        if not self.weights_finite():
            raise Diverged(
                f"stage {self.stage}: the weights are not finite at step {step}; not saved. "
                f"Last good checkpoint: {self.last_good()}"
            )
        path = ckpt.save_checkpoint(self.folder, step, self.model, self.optimizer, trainer_state(), self.run_id)
        if self.dims.is_rank0:
            self._prune(path)
        self.logger.info(f"saved checkpoint {path}")
        return path

    def _prune(self, newest: Path) -> None:
        """Delete this run's checkpoints older than ``newest`` beyond the ``keep`` newest."""
        mine = [p for p in ckpt.complete_checkpoints(self.folder) if p < newest and ckpt.owner(p) == self.run_id]
        for old in mine[: max(0, len(mine) - (self.keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)

    def weights_finite(self) -> bool:
        bad = sum(int(not torch.isfinite(p.detach()).all()) for p in self.model.parameters())
        return all_reduce_sum(torch.tensor(float(bad), device=self.dims.device), self.dims).item() == 0

    def last_good(self) -> str:
        latest = ckpt.latest_checkpoint(self.folder)
        return str(latest) if latest else f"none saved in {self.folder}"

    def saved_at(self, step: int) -> Optional[Path]:
        """The checkpoint already on disk for ``step``: the one resumed from, at the step resumed at."""
        return ckpt.checkpoint_dir(self.folder, step) if step == self.resumed_step else None

    def load(self, path: Path) -> dict[str, Any]:
        """Model, optimizer and this rank's RNG from a checkpoint of this stage; its trainer
        state (step, schedule, data position) for the trainer to take up."""
        state = ckpt.load_checkpoint(path, self.model, self.optimizer)
        self.resumed_step = state["step"]
        ckpt.restore_rng(path)
        return state

    def load_newest(self) -> Optional[tuple[Path, dict[str, Any]]]:
        """The newest checkpoint that passes its checksums, loaded, saying in one line for
        each newer one why it was skipped; None if there is none."""
        for path in reversed(ckpt.complete_checkpoints(self.folder)):
            try:
                return path, self.load(path)
            except ckpt.CheckpointError as e:
                self.logger.info(f"skipping checkpoint {e}")
        return None

    def load_weights(self, path: Path, load_optimizer: bool = False) -> None:
        """Start a stage from another stage's weights: fresh schedule and data position, and a
        fresh optimizer unless ``load_optimizer`` (RoPE tables are derived, never loaded).
        ``hf:PATH`` names a Hugging Face model folder instead of a checkpoint."""
        folder = hf_path(path)
        if folder is not None:
            load_hf_weights(self.model, folder)
        else:
            ckpt.load_checkpoint(path, self.model, self.optimizer if load_optimizer else None)
        self.logger.info(f"initialised weights{' and optimizer' if load_optimizer else ''} from {path}")
