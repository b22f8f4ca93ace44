"""A run's config as every command reads it, checked as far as one config can be.

Hydra's composed YAML is merged into the schema (longtrain/config.py), the model taken
from a Hugging Face folder when ``model.hf_path`` names one, the stage's RoPE and
micro-batch derived; then :func:`check_config` checks the values, the stage's layout over
the ranks (ParallelDims) and the files and folders the config names. What a command checks
about the stages it runs as a whole (run folders, the checkpoint to resume, the tokenizer,
the device) is longtrain/preflight.py, above this module.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Optional

from omegaconf import DictConfig

from longtrain.config import Config, merge_config, require, resolve_stage, validate
from longtrain.data.tokenizer import build_tokenizer
from longtrain.hf import apply_hf_architecture, check_hf_init, export_architecture
from longtrain.parallel.mesh import ParallelDims


def load_config(raw: DictConfig | dict[str, Any], check: bool = True) -> Config:
    """A composed config as a Config, checked unless ``check=False`` (a stage that is only
    read from, not run)."""
    cfg = merge_config(raw)
    if cfg.model.hf_path is not None:
        apply_hf_architecture(cfg)
    resolve_stage(cfg)
    if check:
        check_config(cfg)
    return cfg


def check_config(cfg: Config, world_size: Optional[int] = None) -> None:
    """Values, then the layout over ``world_size`` ranks (default dp × cp: the layout's own
    rules only), then the files and folders; raise ConfigError (one line)."""
    validate(cfg)
    ParallelDims.planned(cfg.parallel, world_size or cfg.parallel.dp * cfg.parallel.cp).check_stage(cfg.stage)
    check_named_paths(cfg)


def check_named_paths(cfg: Config) -> None:
    """The tokenizer folder, data files, the HF folder to start from, prepared mix sources,
    whether transformers can run the model exported after each gate, the run folders."""
    t, d, s, run = cfg.tokenizer, cfg.data, cfg.stage, cfg.run
    if t.type == "hf":
        require(os.path.isdir(str(t.path)), "tokenizer.path", f"no such folder: {t.path}")
    if d.source == "local":
        require(
            bool(glob.glob(str(d.path), recursive=True)),
            "data.path",
            f"no file matches {d.path!r}; give a glob of .txt, .jsonl or .parquet files",
        )
    if s.init_from and s.init_from.startswith("hf:"):
        check_hf_init(cfg, cfg.model.vocab_size or build_tokenizer(t).vocab_size)
    for i, e in enumerate(s.mix):
        if e.prepared:
            require(
                os.path.exists(os.path.join(e.prepared, "manifest.json")),
                f"stage.mix[{i}].prepared",
                f"{e.prepared} is not prepared data (no manifest.json); run python -m longtrain.data.prepare ... out={e.prepared}",
            )
    if cfg.export.after_gate:  # refuse a model transformers cannot run before training it
        export_architecture(cfg.model, cfg.rope)
    require(bool(run.dir) and not os.path.isfile(run.dir), "run.dir", f"{run.dir!r} is a file; give a folder (created if missing)")
    if run.resume not in ("none", "auto"):
        require(
            os.path.isdir(run.resume),
            "run.resume",
            f"no checkpoint folder {run.resume!r}; valid: none, auto, or a checkpoint folder",
        )

