"""What a command checks before compute about the stages it runs, as a whole.

Each stage's config was checked when it was loaded (longtrain/run_config.py: values, the
layout, the files and folders it names). :func:`preflight` adds what only the command
knows: the world size it was started with, stage folders that an earlier run owns, the
checkpoint to resume, the tokenizer and its vocabulary, gate tasks that do not fit their
stage, and the device with its attention kernel's rules. Everything raises ConfigError
(one line, exit 2) before the process group starts or anything is written.
"""

from __future__ import annotations

from pathlib import Path

import torch

from longtrain import checkpoint as ckpt
from longtrain.config import Config, ConfigError, TokenizerConfig, gate_tasks, require
from longtrain.data.tokenizer import Tokenizer, build_tokenizer
from longtrain.eval.needle import fit_error
from longtrain.hardware import check_device
from longtrain.parallel.mesh import ParallelDims, resolve_device
from longtrain.run_dir import check_stage_folders


def preflight(stages: list[Config], world_size: int) -> torch.device:
    """train.py's checks of the stages it runs, on ``world_size`` ranks; the device they run on."""
    for cfg in stages:
        ParallelDims.planned(cfg.parallel, world_size)
        check_attention_method(cfg)
    check_stage_folders(stages)
    check_resume(stages[0].run.resume)
    tokenizer = checked_tokenizer(stages[0].tokenizer)
    for cfg in stages:
        check_vocab(cfg, tokenizer)
        check_gate_tasks_fit(cfg, tokenizer)
    device = resolve_device(stages[0].run.device)
    for cfg in stages:  # the attention kernel this device runs, and what it needs
        check_device(cfg, device)
    return device


def check_attention_method(cfg: Config) -> None:
    """The planner knows Ulysses and hybrid (longtrain/plan_comm.py); until parallelize
    runs them, refuse them rather than train with the ring under another name."""
    p = cfg.parallel
    require(p.cp == 1 or p.cp_method == "ring", "parallel.cp_method",
            f"{p.cp_method} is not available for training yet (python -m longtrain.plan models it); use ring")


def check_resume(resume: str) -> None:
    """``run.resume=PATH`` must be a complete checkpoint whose checksums hold."""
    if resume in ("none", "auto"):
        return
    if not ckpt.is_complete(Path(resume)):
        raise ConfigError(
            f"run.resume: {resume} is not a complete checkpoint (a step_XXXXXXXX folder with "
            f"{ckpt.CHECKSUMS}); valid: none, auto, or such a folder"
        )
    problem = ckpt.verify_checkpoint(Path(resume))
    if problem is not None:
        raise ConfigError(f"run.resume: checkpoint {resume} is damaged: {problem}; use run.resume=auto to take the newest valid one")


def checked_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    try:
        return build_tokenizer(cfg)
    except Exception as e:  # transformers raises many kinds for a folder that is not a tokenizer
        raise ConfigError(
            f"tokenizer.path: {cfg.path} is not a Hugging Face tokenizer folder "
            f"({type(e).__name__}); give a folder saved with save_pretrained (tokenizer.json / tokenizer_config.json)"
        ) from None


def check_vocab(cfg: Config, tokenizer: Tokenizer) -> None:
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} ids; "
            f"use >= {tokenizer.vocab_size} or null (the tokenizer's)"
        )


def check_gate_tasks_fit(cfg: Config, tokenizer: Tokenizer) -> None:
    """A gate task whose samples do not fit the stage length is a config error, found
    before any stage computes, not at the end of training."""
    for task in gate_tasks(cfg):
        why = fit_error(tokenizer, task, cfg.stage.seq_len, cfg.retrieval)
        if why is not None:
            key = "gate.kind" if task == cfg.gate.kind else f"gate.tasks.{task}" if task in cfg.gate.tasks else "gate.report_tasks"
            raise ConfigError(f"{key}: {task} does not fit stage {cfg.stage.name} ({why}); drop it for that stage or lengthen it")
