"""A small real checkpoint, as train.py writes it, for the command-line evaluators' tests."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from longtrain import checkpoint as ckpt
from longtrain.config import Config, ModelConfig
from longtrain.data.tokenizer import ByteTokenizer
from longtrain.model.transformer import Transformer
from longtrain.optim.optimizer import build_optimizer


def tiny_checkpoint(folder: Path, seq_len: int) -> tuple[Path, Transformer]:
    """An untrained 1-layer model saved with its run config (stage length ``seq_len``): the
    checkpoint folder and the model whose weights it holds."""
    cfg = Config()
    cfg.model = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1)
    cfg.stage.seq_len = seq_len
    cfg.data.max_docs = 20  # a few validation files are enough for a haystack
    model = Transformer(cfg.model, cfg.rope, ByteTokenizer().vocab_size)
    state = {"step": 1, "config": OmegaConf.to_yaml(OmegaConf.structured(cfg))}
    return ckpt.save_checkpoint(folder, 1, model, build_optimizer(model, cfg.optim), state, run_id="test"), model
