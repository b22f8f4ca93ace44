"""Everything a stage's trainer needs, made in one place, in a fixed order (seed, tokenizer,
model, optimizer, schedule, data, run id, logger): the order of RNG use, data reads and
collectives that makes runs reproducible and resumable. Then the stage's starting point:
a checkpoint of it to resume (``run.resume``), or another stage's weights.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from longtrain.config import Config
from longtrain.data.loader import StatefulLoader
from longtrain.data.mix import build_train_data
from longtrain.data.packing import packed_dataset
from longtrain.data.shards import open_prepared
from longtrain.data.tokenizer import build_tokenizer
from longtrain.logging import MetricsLogger
from longtrain.model.transformer import Transformer
from longtrain.optim.optimizer import build_optimizer
from longtrain.optim.schedule import build_wsd_scheduler
from longtrain.parallel.mesh import ParallelDims, wait_for_rank0
from longtrain.parallel.parallelize import parallelize
from longtrain.run_dir import run_id
from longtrain.trainer.checkpointer import Checkpointer
from longtrain.trainer.evaluator import Evaluator
from longtrain.trainer.meter import Meter, detect_peak_tflops, flops_per_token
from longtrain.trainer.trainer import StageResult, Trainer


def build_model(cfg: Config, vocab_size: int, dims: ParallelDims) -> Transformer:
    """The model on its device, parallelized: ring attention over the cp group,
    checkpointing, compile, FSDP2 when sharded."""
    model = Transformer(cfg.model, cfg.rope, cfg.model.vocab_size or vocab_size).to(dims.device)
    return parallelize(model, cfg, dims)


def shared_run_id(run_dir: Path, dims: ParallelDims) -> str:
    """The run's id (run.dir/run.json), read or written by rank 0 and given to every rank."""
    ids = [run_id(run_dir) if dims.is_rank0 else None]
    if dims.world_size > 1:
        dist.broadcast_object_list(ids, src=0)
    return ids[0]


def build_trainer(cfg: Config, dims: ParallelDims) -> Trainer:
    """A fresh trainer for ``cfg.stage``: new weights, schedule and data position."""
    stage_dir = Path(cfg.run.dir) / cfg.stage.name
    torch.manual_seed(cfg.run.seed)
    tokenizer = build_tokenizer(cfg.tokenizer)
    model = build_model(cfg, tokenizer.vocab_size, dims)
    optimizer = build_optimizer(model, cfg.optim)
    s = cfg.stage
    scheduler = build_wsd_scheduler(optimizer, s.steps, s.warmup_steps, s.decay_fraction, s.decay_shape, s.final_lr_ratio)
    # Rank 0 prepares once; the others wait on gloo, not on the training group's NCCL timeout.
    prepared = open_prepared(cfg, dims.is_rank0, functools.partial(wait_for_rank0, dims, cfg.parallel.prepare_timeout_s))
    train_data = build_train_data(cfg, tokenizer, prepared)
    loader = StatefulLoader(train_data, s.global_batch_size, s.micro_batch_size, dims.dp_rank, dims.dp)
    val_data = packed_dataset(prepared.stream("val"), s.seq_len, cfg.data)
    run = cfg.run.id or shared_run_id(Path(cfg.run.dir), dims)
    meter = Meter(
        cfg.logging.log_every, s.global_batch_size * s.seq_len, dims.world_size,
        flops_per_token(cfg, model.num_params(exclude_embedding=True)),
        cfg.logging.peak_tflops or detect_peak_tflops(dims.device),
    )
    logger = MetricsLogger(
        stage_dir / "metrics.jsonl",
        cfg.logging,
        enabled=dims.is_rank0,
        run_config=OmegaConf.to_container(OmegaConf.structured(cfg)),
        run_id=run,
        stage=s.name,
        wandb_dir=Path(cfg.run.dir),
    )
    evaluator = Evaluator(model, cfg, dims, tokenizer, prepared, val_data, logger)
    checkpointer = Checkpointer(
        stage_dir / "checkpoints", cfg.run.checkpoint_every, cfg.run.keep_checkpoints, run, s.name,
        model, optimizer, dims, logger,
    )
    return Trainer(cfg, dims, stage_dir, model, optimizer, scheduler, loader, evaluator, checkpointer, meter, logger)


def prepare_trainer(
    cfg: Config, dims: ParallelDims, init_from: Optional[Path] = None, load_optimizer: bool = False
) -> Trainer:
    """A trainer for one stage: resumed if asked (run.resume), else from ``init_from`` weights."""
    trainer = build_trainer(cfg, dims)
    resumed = None
    if cfg.run.resume == "auto":
        resumed = trainer.checkpointer.load_newest()
    elif cfg.run.resume != "none":
        resumed = Path(cfg.run.resume), trainer.checkpointer.load(Path(cfg.run.resume))
    if resumed is not None:
        trainer.resume(*resumed)
    elif init_from is not None:
        trainer.checkpointer.load_weights(init_from, load_optimizer)
    if dims.is_rank0:
        trainer.stage_dir.mkdir(parents=True, exist_ok=True)
        (trainer.stage_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return trainer


def run_stage(cfg: Config, dims: ParallelDims, init_from: Optional[Path] = None) -> StageResult:
    """Train one stage without a gate (the gated path is longtrain.curriculum)."""
    trainer = prepare_trainer(cfg, dims, init_from)
    try:
        return trainer.fit()
    finally:
        trainer.logger.close()
