"""A trained model back from disk: a checkpoint folder (our model, its stored run config)
or a Hugging Face folder (transformers' model, the ``longtrain.yaml`` export wrote).

Below both the evaluators and export, which read models the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf
from torch import Tensor

from longtrain import checkpoint as ckpt
from longtrain.config import Config, ConfigError, TokenizerConfig
from longtrain.data.tokenizer import Tokenizer, build_tokenizer
from longtrain.hf import hf_path
from longtrain.model.transformer import Transformer
from longtrain.optim.loss import TokenScores, token_scores
from longtrain.run_config import load_config

# (input_ids, position_ids, labels) of whole sequences -> each labelled token's loss and argmax,
# [B, T]: everything the evaluations read, and never [B, T, vocab] logits.
ScoreFn = Callable[[Tensor, Tensor, Tensor], TokenScores]

LONGTRAIN_CONFIG = "longtrain.yaml"  # the run config, written into an exported HF folder


def checkpoint_config(checkpoint: Path) -> Config:
    """The run config stored with a checkpoint (ConfigError if the folder is not a complete checkpoint)."""
    if not ckpt.is_complete(checkpoint):
        raise ConfigError(f"checkpoint: {checkpoint} is not a complete checkpoint folder (step_XXXXXXXX with .metadata and {ckpt.TRAINER_STATE})")
    return stored_config(checkpoint)


def stored_config(checkpoint: Path) -> Config:
    state = torch.load(checkpoint / ckpt.TRAINER_STATE, weights_only=False)
    return load_config(OmegaConf.create(state["config"]))


def load_model(checkpoint: Path) -> tuple[Transformer, Config, Tokenizer, torch.device]:
    """Rebuild the model from the config stored with a checkpoint; load weights only; on
    CUDA when there is one."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = stored_config(checkpoint)
    tokenizer = build_tokenizer(cfg.tokenizer)
    model = Transformer(cfg.model, cfg.rope, cfg.model.vocab_size or tokenizer.vocab_size)
    ckpt.load_checkpoint(checkpoint, model)
    return model.to(device).eval(), cfg, tokenizer, device


def scorer(model: Transformer, chunk_size: int) -> ScoreFn:
    """One unsharded model's :data:`ScoreFn`, projecting ``chunk_size`` tokens at a time."""

    @torch.no_grad()
    def score(input_ids: Tensor, position_ids: Tensor, labels: Tensor) -> TokenScores:
        return model(input_ids, position_ids, labels, chunk_size, scores=True)

    return score


def load_scorer(checkpoint: Path) -> tuple[ScoreFn, Config, Tokenizer, torch.device]:
    """:func:`load_model`'s model as a :data:`ScoreFn` with the run's loss chunk size."""
    model, cfg, tokenizer, device = load_model(checkpoint)
    return scorer(model, cfg.optim.loss_chunk_size), cfg, tokenizer, device


def load_hf_model(folder: Path) -> tuple[ScoreFn, Config, Tokenizer, torch.device]:
    """A Hugging Face folder evaluated through transformers' own forward and tokenizer.

    The run config comes from the ``longtrain.yaml`` that export writes (data, gate kind,
    stage length); a folder from elsewhere gets the defaults.
    """
    from transformers import AutoModelForCausalLM  # heavy, and only this path needs it

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stored = folder / LONGTRAIN_CONFIG
    cfg = load_config(OmegaConf.load(stored) if stored.is_file() else {})
    cfg.tokenizer = TokenizerConfig(type="hf", path=str(folder))
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).to(device).eval()

    return hf_scorer(model, cfg.optim.loss_chunk_size), cfg, build_tokenizer(cfg.tokenizer), device


def hf_scorer(model: torch.nn.Module, chunk_size: int) -> ScoreFn:
    """A transformers causal LM as a :data:`ScoreFn`: its decoder's final hidden states and
    its lm head's weight through :func:`token_scores`, so its [T, vocab] logits are not
    formed either."""

    @torch.no_grad()
    def score(input_ids: Tensor, position_ids: Tensor, labels: Tensor) -> TokenScores:
        h = model.get_decoder()(input_ids=input_ids, position_ids=position_ids).last_hidden_state
        return token_scores(h.float(), model.get_output_embeddings().weight.float(), labels, chunk_size)

    return score


def load_source(checkpoint: str) -> tuple[ScoreFn, Config, Tokenizer, torch.device, Path]:
    """A checkpoint folder, or ``hf:FOLDER``, as (scores, its run config, tokenizer, device, folder)."""
    source = hf_path(checkpoint)
    if source is not None:
        return (*load_hf_model(source), source)
    return (*load_scorer(Path(checkpoint)), Path(checkpoint))
