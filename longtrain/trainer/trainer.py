"""The training loop for one stage, given its parts (``builder.py`` makes them). Reads like the recipe:

for each step: take this rank's micro-batches, shard them over cp, forward + backward
with the loss divided by the global token count, clip, step (skipped if the loss or grad
norm is not finite), schedule → log, validate, checkpoint; on a stop signal, checkpoint
and stop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from longtrain import preemption
from longtrain.config import Config
from longtrain.data.loader import StatefulLoader
from longtrain.logging import MetricsLogger
from longtrain.model.transformer import Transformer
from longtrain.optim.loss import total_loss
from longtrain.optim.schedule import build_wsd_scheduler
from longtrain.parallel.mesh import ParallelDims, all_reduce_sum
from longtrain.parallel.sharding import zigzag_shard_batch
from longtrain.run_dir import truncate_metrics
from longtrain.trainer.checkpointer import Checkpointer, Diverged
from longtrain.trainer.evaluator import Batch, Evaluator
from longtrain.trainer.meter import Meter, estimate_line


@dataclass
class StageResult:
    stage_dir: Path
    checkpoint: Path
    step: int
    val_loss: float


class Trainer:
    def __init__(
        self, cfg: Config, dims: ParallelDims, stage_dir: Path, model: Transformer, optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler, loader: StatefulLoader, evaluator: Evaluator,
        checkpointer: Checkpointer, meter: Meter, logger: MetricsLogger,
    ):
        self.cfg, self.dims, self.stage_dir = cfg, dims, stage_dir
        self.model, self.optimizer, self.scheduler, self.loader = model, optimizer, scheduler, loader
        self.evaluator, self.checkpointer, self.meter, self.logger = evaluator, checkpointer, meter, logger
        self.step = 0
        # The stage's steps, and a failed gate's extra steps once train_more adds them.
        self.total_steps = cfg.stage.steps
        self.nonfinite_in_a_row = 0

    # -- state ----------------------------------------------------------------------------

    def trainer_state(self) -> dict[str, Any]:
        config = OmegaConf.structured(self.cfg)
        config.stage.steps = self.total_steps  # the stage as trained: extra gate steps included
        return {
            "step": self.step,
            "stage": self.cfg.stage.name,
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "config": OmegaConf.to_yaml(config),
        }

    def resume(self, path: Path, state: dict[str, Any]) -> None:
        """Continue a stage exactly where a checkpoint of it (loaded by the checkpointer) left off."""
        self.step = state["step"]
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        if self.dims.is_rank0:
            truncate_metrics(self.stage_dir, self.step)
        self.logger.info(f"resumed from {path} at step {self.step}")

    def save(self) -> Path:
        """A checkpoint of this step, whatever the interval."""
        return self.checkpointer.save(self.step, self.trainer_state, last_step=True)

    # -- steps ----------------------------------------------------------------------------

    def forward_backward(self, micro_batches: list[Batch]) -> dict[str, torch.Tensor]:
        """Accumulate gradients of the global mean loss over this rank's micro-batches.

        Every micro-batch's loss is divided by the token count of the whole optimizer step
        over all ranks, so gradients sum to the gradient of the global mean (not a mean of
        means, which is wrong when ranks hold different numbers of tokens).
        """
        # Any partition of the tokens over the cp ranks sums to the same count: zigzag's, of
        # the labels alone (local_batch shards the whole micro-batch, by its own balancer).
        local_labels = [zigzag_shard_batch({"labels": b["labels"]}, self.dims.cp_rank, self.dims.cp)["labels"]
                        for b in micro_batches]
        local_tokens = sum(int((labels != -100).sum()) for labels in local_labels)
        global_tokens = all_reduce_sum(torch.tensor(float(local_tokens), device=self.dims.device), self.dims)
        ce = torch.zeros((), device=self.dims.device)
        z = torch.zeros((), device=self.dims.device)
        for i, batch in enumerate(micro_batches):
            if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2: reduce once, at the end
                self.model.set_requires_gradient_sync(i == len(micro_batches) - 1)
            with self.evaluator.local_batch(batch) as local:
                sums = self.evaluator.loss_sums(local)
                total_loss(sums, global_tokens).backward()
            ce += sums.ce.detach()
            z += sums.z.detach()
        return {"ce": all_reduce_sum(ce, self.dims), "z": all_reduce_sum(z, self.dims), "tokens": global_tokens}

    def train_step(self) -> dict[str, float]:
        """One optimizer step; a step whose loss or grad norm is not finite is skipped.

        Loss and grad norm are reduced over all ranks, so every rank skips the same steps.
        A skipped step consumes its batch but neither moves the weights nor the schedule
        (as Megatron skips an overflowing step); too many in a row raise :class:`Diverged`.
        """
        sums = self.forward_backward(self.loader.next_batch())
        grad_norm = self.clip_gradients()
        metrics = {
            "loss": (sums["ce"] / sums["tokens"]).item(),
            "z_loss": (self.cfg.optim.z_loss * sums["z"] / sums["tokens"]).item(),  # its share of the loss
            "grad_norm": grad_norm,
        }
        finite = all(map(math.isfinite, metrics.values()))
        if finite:
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_a_row = 0 if finite else self.nonfinite_in_a_row + 1
        if self.nonfinite_in_a_row >= self.cfg.optim.max_nonfinite_steps:
            raise Diverged(
                f"stage {self.cfg.stage.name} diverged: {self.nonfinite_in_a_row} steps in a row after step {self.step} "
                f"had a non-finite loss or grad norm (skipped, optim.max_nonfinite_steps={self.cfg.optim.max_nonfinite_steps}); "
                f"last good checkpoint: {self.checkpointer.last_good()}; lower optim.lr or raise optim.warmup_steps"
            )
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics["skipped"] = 0 if finite else 1
        return metrics

    def clip_gradients(self) -> float:
        max_norm = self.cfg.optim.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    def should_validate(self, step: int, last_step: bool) -> bool:
        return bool(self.cfg.eval.val_every) and (step % self.cfg.eval.val_every == 0 or last_step)

    def train_more(self, total_steps: int) -> StageResult:
        """Train on to ``total_steps``, beyond the stage's schedule (a failed gate's extra increment).

        The stage's WSD schedule has decayed by now, so the increment gets its own short
        cycle: no warmup, ``gate.extra_lr_ratio`` of the peak LR, then the stage's decay.
        """
        s = self.cfg.stage
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.cfg.optim.lr * self.cfg.gate.extra_lr_ratio
        self.scheduler = build_wsd_scheduler(
            self.optimizer, total_steps - self.total_steps, 0, s.decay_fraction, s.decay_shape, s.final_lr_ratio
        )
        self.total_steps = total_steps
        return self.fit()

    # -- the loop -------------------------------------------------------------------------

    def fit(self) -> StageResult:
        cfg = self.cfg
        self.logger.info(
            f"stage {cfg.stage.name}: {self.total_steps} steps of {cfg.stage.global_batch_size}×{cfg.stage.seq_len} "
            f"tokens, model {self.model.num_params() / 1e6:.2f}M params, dp={self.dims.dp} cp={self.dims.cp}, "
            f"device {self.dims.device}"
        )
        self.logger.info(estimate_line(cfg, self.model.num_params(exclude_embedding=True), self.total_steps - self.step,
                                       self.dims.world_size, self.dims.device, self.meter.peak_tflops))
        val_loss = float("nan")
        if self.step == 0 and cfg.eval.val_every:
            val_loss = self.evaluator.validate()
            self.logger.log(0, {"loss": val_loss}, prefix="val")
        # Resumed at the end of the stage: its checkpoint is already on disk.
        saved = self.checkpointer.saved_at(self.step)
        self.meter.start(self.step)
        with preemption.deferring_interrupts():  # Ctrl-C: finish the step, save, stop
            while self.step < self.total_steps:
                metrics = self.train_step()
                self.meter.count_step()
                last_step = self.step == self.total_steps
                if self.meter.should_log(self.step, last_step):
                    metrics.update(self.meter.throughput())
                    self.logger.log(self.step, metrics, progress=self.meter.progress(self.step, self.total_steps))
                if self.should_validate(self.step, last_step):
                    val_loss = self.evaluator.validate()
                    self.logger.log(self.step, {"loss": val_loss}, prefix="val")
                stop = preemption.stop_requested(self.dims)
                saved = self.checkpointer.save(self.step, self.trainer_state, last_step=stop is not None)
                if stop:
                    raise preemption.Preempted(
                        f"{stop} at step {self.step} of stage {cfg.stage.name}: saved {saved}; continue with run.resume=auto",
                        stop, self.step,
                    )
            final = saved or self.save()
        return StageResult(self.stage_dir, final, self.step, val_loss)
