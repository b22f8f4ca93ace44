"""The training loop for one stage. Reads like the recipe:

build model → (load weights of the stage before | resume) → for each step: take this
rank's micro-batches, shard them over cp, forward + backward with the loss divided by the
global token count, clip, step (skipped if the loss or grad norm is not finite), schedule
→ log, validate, checkpoint; on a stop signal, checkpoint and stop.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from longtrain import checkpoint as ckpt
from longtrain import preemption
from longtrain.attention.ring import ring_attention
from longtrain.config import Config
from longtrain.data.loader import StatefulLoader
from longtrain.data.mix import build_train_data
from longtrain.data.packing import PackedDataset, packed_dataset
from longtrain.data.shards import open_prepared
from longtrain.data.tokenizer import build_tokenizer
from longtrain.hardware import autocast_dtype, peak_bf16_tflops
from longtrain.hf import hf_path, load_hf_weights
from longtrain.logging import MetricsLogger
from longtrain.model.transformer import Transformer
from longtrain.optim.loss import LossSums, total_loss
from longtrain.optim.optimizer import build_optimizer
from longtrain.optim.schedule import build_wsd_scheduler
from longtrain.parallel.mesh import ParallelDims, all_reduce_sum, apply_fsdp
from longtrain.parallel.sharding import zigzag_shard, zigzag_unshard
from longtrain.run_dir import run_id, truncate_metrics

Batch = dict[str, torch.Tensor]


class Diverged(RuntimeError):
    """Training produced non-finite values it could not skip past; the message says where to go back to."""


@dataclass
class StageResult:
    stage_dir: Path
    checkpoint: Path
    step: int
    val_loss: float


def build_model(cfg: Config, vocab_size: int, pd: ParallelDims) -> Transformer:
    """The model on its device, with ring attention over the cp group and FSDP2 when sharded."""
    model = Transformer(cfg.model, cfg.rope, cfg.model.vocab_size or vocab_size).to(pd.device)
    if pd.cp > 1:
        model.attention_fn = functools.partial(ring_attention, group=pd.cp_group)
    if cfg.model.compile:  # after the attention is chosen, before FSDP2 wraps the blocks
        model.compile_blocks()
    if pd.world_size > 1:
        apply_fsdp(model, pd)
    return model


def flops_per_token(cfg: Config, non_embedding_params: int) -> float:
    """Training FLOPs per token, torchtitan's convention: 6N + 6·layers·heads·head_dim·seq.

    N excludes the embedding (a lookup, not a matmul); the attention term counts the full
    T×T score matrix (no causal discount), so MFU is comparable with torchtitan's.
    """
    m = cfg.model
    return 6 * non_embedding_params + 6 * m.n_layers * m.n_heads * m.resolved_head_dim() * cfg.stage.seq_len


def detect_peak_tflops(device: torch.device) -> Optional[float]:
    """Dense bf16 peak TFLOP/s of a known GPU (H100 SXM / PCIe / NVL told apart), for MFU
    when logging.peak_tflops is not given."""
    if device.type != "cuda":
        return None  # no meaningful peak for a CPU: set logging.peak_tflops to get MFU
    return peak_bf16_tflops(torch.cuda.get_device_name(device))


def shared_run_id(run_dir: Path, pd: ParallelDims) -> str:
    """The run's id (run.dir/run.json), read or written by rank 0 and given to every rank."""
    ids = [run_id(run_dir) if pd.is_rank0 else None]
    if pd.world_size > 1:
        dist.broadcast_object_list(ids, src=0)
    return ids[0]


def shard_batch(batch: Batch, pd: ParallelDims) -> Batch:
    """This rank's zigzag chunks of every per-token tensor (labels were shifted before)."""
    if pd.cp == 1:
        return batch
    return {k: zigzag_shard(v, pd.cp_rank, pd.cp, dim=1) for k, v in batch.items()}


class Trainer:
    def __init__(self, cfg: Config, pd: ParallelDims):
        self.cfg, self.pd = cfg, pd
        self.stage_dir = Path(cfg.run.dir) / cfg.stage.name
        self.ckpt_root = self.stage_dir / "checkpoints"
        torch.manual_seed(cfg.run.seed)
        self.tokenizer = build_tokenizer(cfg.tokenizer)
        self.model = build_model(cfg, self.tokenizer.vocab_size, pd)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        s = cfg.stage
        self.scheduler = build_wsd_scheduler(
            self.optimizer, s.steps, s.warmup_steps, s.decay_fraction, s.decay_shape, s.final_lr_ratio
        )
        self.prepared = open_prepared(cfg, pd.is_rank0)  # rank 0 prepares once; the others wait
        train_data = build_train_data(cfg, self.tokenizer, self.prepared)
        self.loader = StatefulLoader(train_data, s.global_batch_size, s.micro_batch_size, pd.dp_rank, pd.dp)
        self.val_data: PackedDataset = packed_dataset(self.prepared.stream("val"), s.seq_len, cfg.data)
        self.step = 0
        self.resumed_step: Optional[int] = None
        self.nonfinite_in_a_row = 0
        self.run_id = cfg.run.id or shared_run_id(Path(cfg.run.dir), pd)
        self.flops_per_token = flops_per_token(cfg, self.model.num_params(exclude_embedding=True))
        self.peak_tflops = cfg.logging.peak_tflops or detect_peak_tflops(pd.device)
        self.autocast = self._autocast_context()
        self.logger = MetricsLogger(
            self.stage_dir / "metrics.jsonl",
            cfg.logging,
            enabled=pd.is_rank0,
            run_config=OmegaConf.to_container(OmegaConf.structured(cfg)),
            run_id=self.run_id,
            stage=s.name,
            wandb_dir=Path(cfg.run.dir),
        )

    def _autocast_context(self):
        dtype = autocast_dtype(self.cfg.run.dtype, self.pd.device.type)
        if dtype is None:
            return contextlib.nullcontext
        return functools.partial(torch.autocast, self.pd.device.type, dtype=dtype)

    # -- state ----------------------------------------------------------------------------

    def trainer_state(self) -> dict:
        return {
            "step": self.step,
            "stage": self.cfg.stage.name,
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "config": OmegaConf.to_yaml(OmegaConf.structured(self.cfg)),
        }

    def resume(self, path: Path) -> None:
        """Continue a stage exactly where a checkpoint of it left off."""
        state = ckpt.load_checkpoint(path, self.model, self.optimizer)
        self.step = self.resumed_step = state["step"]
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        ckpt.restore_rng(path)
        if self.pd.is_rank0:
            truncate_metrics(self.stage_dir, self.step)
        self.logger.info(f"resumed from {path} at step {self.step}")

    def resume_newest(self) -> Optional[Path]:
        """Resume from the newest checkpoint that passes its checksums, saying in one line
        for each newer one why it was skipped; None if there is none."""
        for path in reversed(ckpt.complete_checkpoints(self.ckpt_root)):
            try:
                self.resume(path)
                return path
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

    def save(self) -> Path:
        if not self.weights_finite():
            raise Diverged(
                f"stage {self.cfg.stage.name}: the weights are not finite at step {self.step}; not saved. "
                f"Last good checkpoint: {self.last_good_checkpoint()}"
            )
        path = ckpt.save_checkpoint(
            self.ckpt_root, self.step, self.model, self.optimizer, self.trainer_state(),
            self.cfg.run.keep_checkpoints, self.run_id,
        )
        self.logger.info(f"saved checkpoint {path}")
        return path

    # -- steps ----------------------------------------------------------------------------

    def forward_sums(self, batch: Batch) -> LossSums:
        batch = {k: v.to(self.pd.device) for k, v in shard_batch(batch, self.pd).items()}
        with self.autocast():
            return self.model(
                batch["input_ids"], batch["position_ids"], batch["labels"], self.cfg.optim.loss_chunk_size,
                doc_ids=batch["doc_ids"] if self.cfg.data.document_masking else None, z_loss=self.cfg.optim.z_loss,
            )

    def forward_backward(self, micro_batches: list[Batch]) -> dict[str, torch.Tensor]:
        """Accumulate gradients of the global mean loss over this rank's micro-batches.

        Every micro-batch's loss is divided by the token count of the whole optimizer step
        over all ranks, so gradients sum to the gradient of the global mean (not a mean of
        means, which is wrong when ranks hold different numbers of tokens).
        """
        local_tokens = sum(int((shard_batch(b, self.pd)["labels"] != -100).sum()) for b in micro_batches)
        global_tokens = all_reduce_sum(torch.tensor(float(local_tokens), device=self.pd.device), self.pd)
        ce = torch.zeros((), device=self.pd.device)
        z = torch.zeros((), device=self.pd.device)
        for i, batch in enumerate(micro_batches):
            if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2: reduce once, at the end
                self.model.set_requires_gradient_sync(i == len(micro_batches) - 1)
            sums = self.forward_sums(batch)
            total_loss(sums, global_tokens).backward()
            ce += sums.ce.detach()
            z += sums.z.detach()
        return {"ce": all_reduce_sum(ce, self.pd), "z": all_reduce_sum(z, self.pd), "tokens": global_tokens}

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
                f"last good checkpoint: {self.last_good_checkpoint()}; lower optim.lr or raise optim.warmup_steps"
            )
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics["skipped"] = 0 if finite else 1
        return metrics

    def weights_finite(self) -> bool:
        bad = sum(int(not torch.isfinite(p.detach()).all()) for p in self.model.parameters())
        return all_reduce_sum(torch.tensor(float(bad), device=self.pd.device), self.pd).item() == 0

    def last_good_checkpoint(self) -> str:
        latest = ckpt.latest_checkpoint(self.ckpt_root)
        return str(latest) if latest else f"none saved in {self.ckpt_root}"

    def logits_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """(input_ids, position_ids) of whole sequences → full logits, sharded over cp if needed."""

        def forward(input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
            batch = shard_batch({"input_ids": input_ids, "position_ids": position_ids}, self.pd)
            with torch.no_grad(), self.autocast():
                logits = self.model(batch["input_ids"], batch["position_ids"]).float()
            if self.pd.cp == 1:
                return logits
            shards = [torch.empty_like(logits) for _ in range(self.pd.cp)]
            dist.all_gather(shards, logits.contiguous(), group=self.pd.cp_group)
            return zigzag_unshard(shards, self.pd.cp, dim=1)

        return forward

    def train_more(self, steps: int) -> StageResult:
        """Train ``steps`` beyond the stage's schedule (a failed gate's extra increment).

        The stage's WSD schedule has decayed by now, so the increment gets its own short
        cycle: no warmup, ``gate.extra_lr_ratio`` of the peak LR, then the stage's decay.
        """
        s = self.cfg.stage
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.cfg.optim.lr * self.cfg.gate.extra_lr_ratio
        self.scheduler = build_wsd_scheduler(self.optimizer, steps, 0, s.decay_fraction, s.decay_shape, s.final_lr_ratio)
        s.steps += steps
        return self.fit()

    def clip_gradients(self) -> float:
        max_norm = self.cfg.optim.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """The model in eval mode for an evaluation, back in train mode after it (even on error)."""
        self.model.eval()
        try:
            yield
        finally:
            self.model.train()

    @torch.no_grad()
    def validate(
        self, data: Optional[PackedDataset] = None, samples: Optional[int] = None, batch_size: Optional[int] = None
    ) -> float:
        """Mean loss per token over validation samples 0 … samples-1 (nats/token).

        Defaults to eval.val_batches micro-batches of the stage's validation set; the gate
        passes a short-context set with its own fixed sample count and batch size.
        """
        data = data or self.val_data
        mb = batch_size or self.cfg.stage.micro_batch_size
        n = samples or self.cfg.eval.val_batches * self.cfg.stage.micro_batch_size
        # Split the fixed set evenly over dp: every rank must run as many forwards (FSDP collectives).
        n = max(n - n % self.pd.dp, self.pd.dp)
        indices = list(range(self.pd.dp_rank, n, self.pd.dp))
        ce = torch.zeros((), device=self.pd.device)
        tokens = torch.zeros((), device=self.pd.device)
        with self.eval_mode():
            for start in range(0, len(indices), mb):
                chunk = [data.sample(i) for i in indices[start : start + mb]]
                batch = {k: torch.stack([s[k] for s in chunk]) for k in chunk[0]}
                sums = self.forward_sums(batch)
                ce += sums.ce
                tokens += sums.tokens
        return float(all_reduce_sum(ce, self.pd) / all_reduce_sum(tokens, self.pd))

    # -- the loop -------------------------------------------------------------------------

    def fit(self) -> StageResult:
        cfg = self.cfg
        self.logger.info(
            f"stage {cfg.stage.name}: {cfg.stage.steps} steps of {cfg.stage.global_batch_size}×{cfg.stage.seq_len} "
            f"tokens, model {self.model.num_params() / 1e6:.2f}M params, dp={self.pd.dp} cp={self.pd.cp}, "
            f"device {self.pd.device}"
        )
        val_loss = float("nan")
        if self.step == 0 and cfg.eval.val_every:
            val_loss = self.validate()
            self.logger.log(0, {"loss": val_loss}, prefix="val")
        # Resumed at the end of the stage: its checkpoint is already on disk.
        last_saved = ckpt.checkpoint_dir(self.ckpt_root, self.step) if self.step == self.resumed_step else None
        window_start, window_tokens = time.perf_counter(), 0
        while self.step < cfg.stage.steps:
            metrics = self.train_step()
            # Throughput counts every token processed, not only the labelled ones (answer-only
            # retrieval samples label a few percent of theirs).
            window_tokens += cfg.stage.global_batch_size * cfg.stage.seq_len
            last_saved = None
            if self.step % cfg.logging.log_every == 0 or self.step == cfg.stage.steps:
                elapsed = time.perf_counter() - window_start
                # Per device, after sharding: tokens this window ÷ time ÷ world size.
                metrics["tokens_per_s"] = window_tokens / elapsed / self.pd.world_size
                metrics["tflops"] = metrics["tokens_per_s"] * self.flops_per_token / 1e12
                if self.peak_tflops:
                    metrics["mfu"] = metrics["tflops"] / self.peak_tflops
                self.logger.log(self.step, metrics)
                window_start, window_tokens = time.perf_counter(), 0
            if cfg.eval.val_every and (self.step % cfg.eval.val_every == 0 or self.step == cfg.stage.steps):
                val_loss = self.validate()
                self.logger.log(self.step, {"loss": val_loss}, prefix="val")
            stop = preemption.stop_requested(self.pd)
            if self.step % cfg.run.checkpoint_every == 0 or stop:
                last_saved = self.save()
            if stop:
                raise preemption.Preempted(
                    f"{preemption.received() or 'a stop signal'} at step {self.step} of stage {cfg.stage.name}: "
                    f"saved {last_saved}; continue with run.resume=auto"
                )
        final = last_saved or self.save()
        return StageResult(self.stage_dir, final, self.step, val_loss)


def prepare_trainer(
    cfg: Config, pd: ParallelDims, init_from: Optional[Path] = None, load_optimizer: bool = False
) -> Trainer:
    """A trainer for one stage: resumed if asked (run.resume), else from ``init_from`` weights."""
    trainer = Trainer(cfg, pd)
    resumed = None
    if cfg.run.resume == "auto":
        resumed = trainer.resume_newest()
    elif cfg.run.resume != "none":
        resumed = Path(cfg.run.resume)
        trainer.resume(resumed)
    if resumed is None and init_from is not None:
        trainer.load_weights(init_from, load_optimizer)
    if pd.is_rank0:
        trainer.stage_dir.mkdir(parents=True, exist_ok=True)
        (trainer.stage_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return trainer


def run_stage(cfg: Config, pd: ParallelDims, init_from: Optional[Path] = None) -> StageResult:
    """Train one stage without a gate (the gated path is longtrain.curriculum)."""
    trainer = prepare_trainer(cfg, pd, init_from)
    try:
        return trainer.fit()
    finally:
        trainer.logger.close()
