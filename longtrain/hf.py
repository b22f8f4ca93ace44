"""Hugging Face interop: the architectures we map onto, their config and weight names, and import.

One place holds the correspondence between our model and transformers' classes, used in
both directions: ``stage.init_from=hf:PATH`` reads a local folder (config.json +
safetensors) into a run, and ``longtrain.export`` writes one.

- ``Qwen3ForCausalLM``: GQA + per-head QK-norm (``model.qk_norm=true``), RoPE on every layer.
- ``LlamaForCausalLM``: no QK-norm (``model.qk_norm=false``), RoPE on every layer.
- ``SmolLM3ForCausalLM``: no QK-norm, every k-th layer without RoPE (``model.nope_every=k``).

Weights are read one tensor at a time (``safe_open``), and under FSDP2 each rank keeps only
its shard of it, so no rank ever holds more than one full tensor of the model.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from longtrain.config import Config, ConfigError, ModelConfig, RopeConfig
from longtrain.model.transformer import Transformer

HF_PREFIX = "hf:"
# architecture → whether its layers have per-head QK-norm
ARCHITECTURES = {"Qwen3ForCausalLM": True, "LlamaForCausalLM": False, "SmolLM3ForCausalLM": False}
MODEL_TYPES = {"Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama", "SmolLM3ForCausalLM": "smollm3"}
CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

# Our module path inside a block → transformers' (the leaf, weight, is shared).
_BLOCK_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "attention.q_norm": "self_attn.q_norm",
    "attention.k_norm": "self_attn.k_norm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def hf_name(name: str) -> str:
    """Our state-dict key → transformers' (e.g. layers.0.attention.wq.weight → model.layers.0.self_attn.q_proj.weight)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    _, index, rest = name.split(".", 2)
    module, leaf = rest.rsplit(".", 1)
    return f"model.layers.{index}.{_BLOCK_NAMES[module]}.{leaf}"


def hf_path(init_from: Optional[str | Path]) -> Optional[Path]:
    """The folder of an ``hf:PATH`` value of stage.init_from, or None for a longtrain checkpoint."""
    text = str(init_from) if init_from is not None else ""
    return Path(text[len(HF_PREFIX) :]) if text.startswith(HF_PREFIX) else None


# -- config ------------------------------------------------------------------------------


def read_hf_config(path: Path, key: str) -> dict[str, Any]:
    """config.json of a supported architecture; ``key`` is the config key that named the folder."""
    file = path / CONFIG_FILE
    if not file.is_file():
        raise ConfigError(f"{key}: no {CONFIG_FILE} in {path}; give a local Hugging Face model folder")
    try:
        hf = json.loads(file.read_text())
    except ValueError as e:
        raise ConfigError(f"{key}: {file} is not valid JSON ({e})") from None
    arch = (hf.get("architectures") or ["<none>"])[0]
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{key}: {file} has architecture {arch}, which is not supported; supported: {', '.join(ARCHITECTURES)}")
    return hf


def nope_every_of(hf: dict[str, Any]) -> Optional[int]:
    """SmolLM3's ``no_rope_layers`` (1 = RoPE, 0 = NoPE) as model.nope_every, None if no k fits."""
    flags = hf.get("no_rope_layers")
    if not flags:
        return 0
    return next((k for k in range(len(flags) + 1) if flags == nope_layer_flags(k, len(flags))), None)


def nope_layer_flags(nope_every: int, n_layers: int) -> list[int]:
    """model.nope_every as SmolLM3's ``no_rope_layers`` (the inverse of :func:`nope_every_of`)."""
    return [int(not (nope_every and (i + 1) % nope_every == 0)) for i in range(n_layers)]


def model_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields a transformers config determines."""
    heads = hf["num_attention_heads"]
    return {
        "dim": hf["hidden_size"],
        "n_layers": hf["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
        "ffn_dim": hf["intermediate_size"],
        "qk_norm": ARCHITECTURES[hf["architectures"][0]],
        "nope_every": nope_every_of(hf),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "norm_eps": hf["rms_norm_eps"],
        "vocab_size": hf["vocab_size"],
    }


def rope_parameters_of(hf: dict[str, Any]) -> dict[str, Any]:
    # transformers 4.x wrote rope_theta + rope_scaling; 5.x writes rope_parameters.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def refuse_unsupported_features(hf: dict[str, Any], key: str, path: Path) -> None:
    """Settings of a supported class that our model cannot reproduce: one ConfigError line."""
    bad = [f"{k}=true" for k in ("attention_bias", "mlp_bias") if hf.get(k)]
    if hf.get("hidden_act", "silu") != "silu":
        bad.append(f"hidden_act={hf['hidden_act']} (we have SwiGLU with silu)")
    if hf.get("use_sliding_window"):
        bad.append("use_sliding_window=true")
    if rope_parameters_of(hf).get("partial_rotary_factor", 1.0) != 1.0:
        bad.append("partial_rotary_factor != 1")
    if nope_every_of(hf) is None:
        bad.append(f"no_rope_layers={hf['no_rope_layers']} (not every k-th layer, which model.nope_every expresses)")
    if bad:
        raise ConfigError(f"{key}: {path / CONFIG_FILE} has {', '.join(bad)}, which longtrain's model cannot express")


def apply_hf_architecture(cfg: Config) -> None:
    """``model.hf_path`` set (model=hf): take every model field and rope.theta from that folder."""
    path = Path(cfg.model.hf_path)
    hf = read_hf_config(path, "model.hf_path")
    refuse_unsupported_features(hf, "model.hf_path", path)
    for key, value in model_fields(hf).items():
        setattr(cfg.model, key, value)
    cfg.rope.theta = float(rope_parameters_of(hf)["rope_theta"])


def _rope_mismatches(rope: RopeConfig, stage_theta_is_new: bool, params: dict[str, Any]) -> list[str]:
    """Keys where the folder's RoPE disagrees with the run's.

    A plain-RoPE model may be extended with any scaling (that is the point), but its base
    must be the run's, unless rope=abf gives the stage a new base on purpose. A model that
    is already scaled must be continued with the same scaling.
    """
    hf_type = params["rope_type"]
    ours = "default" if rope.type == "abf" else rope.type
    out = []
    if float(params["rope_theta"]) != rope.theta and not stage_theta_is_new:
        out.append(f"rope.theta={rope.theta} (hf rope_theta={params['rope_theta']})")
    if hf_type == "default":
        return out
    if hf_type != ours:
        return [*out, f"rope.type={rope.type} (hf rope_type={hf_type})"]
    for key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "low_freq_factor", "high_freq_factor"):
        if key in params and params[key] is not None and float(params[key]) != float(getattr(rope, key) or 0):
            out.append(f"rope.{key}={getattr(rope, key)} (hf {key}={params[key]})")
    return out


def check_hf_init(cfg: Config, vocab_size: int) -> None:
    """stage.init_from=hf:PATH must name a supported model whose shapes and RoPE are the run's.

    ``vocab_size`` is the run's (model.vocab_size or the tokenizer's). One line lists
    every mismatched key, or says which architectures are supported.
    """
    path = hf_path(cfg.stage.init_from)
    assert path is not None
    key = "stage.init_from"
    if not path.is_dir():
        raise ConfigError(f"{key}: no such folder {path}; give hf: followed by a local Hugging Face model folder")
    hf = read_hf_config(path, key)
    if not (path / SAFETENSORS_FILE).is_file() and not (path / SAFETENSORS_INDEX).is_file():
        raise ConfigError(f"{key}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} in {path}")
    refuse_unsupported_features(hf, key, path)
    m = cfg.model
    ours = {**asdict(m), "head_dim": m.resolved_head_dim(), "ffn_dim": m.resolved_ffn_dim(), "vocab_size": vocab_size}
    bad = [f"model.{k}={ours[k]} (hf {v})" for k, v in model_fields(hf).items() if ours[k] != v]
    stage_theta_is_new = cfg.rope.type == "abf" and cfg.stage.abf_theta is not None
    bad += _rope_mismatches(cfg.rope, stage_theta_is_new, rope_parameters_of(hf))
    if bad:
        raise ConfigError(
            f"{key}: {path / CONFIG_FILE} disagrees with the run: {'; '.join(bad)}; "
            f"set these keys, or model=hf model.hf_path={path} to take the model from the folder"
        )
    if cfg.stage.load_optimizer:
        raise ConfigError(f"{key}: a Hugging Face folder holds no optimizer state; set stage.load_optimizer=false")
    with torch.device("meta"):  # names and shapes only, no memory
        shapes = parameter_shapes(Transformer(cfg.model, cfg.rope, vocab_size))
    problem = weight_mismatches(shapes, path)
    if problem:
        raise ConfigError(f"{key}: {problem}")


# -- weights -----------------------------------------------------------------------------


def weight_files(path: Path) -> dict[str, Path]:
    """transformers' tensor name → the safetensors file holding it (sharded or not)."""
    from safetensors import safe_open

    index = path / SAFETENSORS_INDEX
    if index.is_file():
        return {name: path / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    with safe_open(path / SAFETENSORS_FILE, framework="pt") as f:
        return {name: path / SAFETENSORS_FILE for name in f.keys()}


def read_tensor(file: Path, name: str) -> torch.Tensor:
    """One full tensor from a safetensors file (memory-mapped; only this tensor is read)."""
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        return f.get_tensor(name)


def _shape_of(files: dict[str, Path], name: str) -> list[int]:
    from safetensors import safe_open

    with safe_open(files[name], framework="pt") as f:
        return list(f.get_slice(name).get_shape())


def weight_mismatches(shapes: dict[str, list[int]], path: Path) -> Optional[str]:
    """What keeps the folder's tensors from loading into a model with these (our name → shape)
    parameters, in one line; None when every name and shape fits. Reads only the headers."""
    files = weight_files(path)
    wanted = {hf_name(name): shape for name, shape in shapes.items()}
    missing = sorted(set(wanted) - set(files))
    # A tied model's files may still carry lm_head.weight (a copy of the embedding).
    unexpected = sorted(set(files) - set(wanted) - {"lm_head.weight"})
    wrong = [f"{n} {_shape_of(files, n)} (ours {wanted[n]})" for n in sorted(set(wanted) & set(files)) if _shape_of(files, n) != wanted[n]]
    parts = [f"{what} {', '.join(names)}" for what, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if names]
    return f"the weights in {path} do not fit the model: {'; '.join(parts)}" if parts else None


def parameter_shapes(model: nn.Module) -> dict[str, list[int]]:
    return {name: list(p.shape) for name, p in model.named_parameters()}


@torch.no_grad()
def load_hf_weights(model: nn.Module, path: Path) -> None:
    """Copy a Hugging Face folder's weights into ``model`` (plain or FSDP2-sharded).

    Names and shapes are checked against the files' headers before anything is read; then
    each tensor is read alone and, under FSDP2, cut to this rank's shard before the next.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    problem = weight_mismatches(parameter_shapes(model), path)
    if problem:
        raise ConfigError(f"stage.init_from: {problem}")
    files = weight_files(path)
    for name, param in model.named_parameters():
        full = read_tensor(files[hf_name(name)], hf_name(name)).to(device=param.device, dtype=param.dtype)
        if isinstance(param, DTensor):
            # Every rank read the same tensor, so each cuts its own shard without communication.
            param.to_local().copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local())
        else:
            param.copy_(full)
        del full  # before the next read: one full tensor at a time


# -- export ------------------------------------------------------------------------------


def rope_parameters(rope: RopeConfig) -> dict[str, Any]:
    """A stage's RoPE as transformers' ``rope_parameters`` (abf is plain RoPE with its raised base)."""
    params: dict[str, Any] = {"rope_type": "default" if rope.type == "abf" else rope.type, "rope_theta": rope.theta}
    if rope.type in ("linear", "dynamic", "yarn", "llama3"):
        params["factor"] = rope.factor
    if rope.type in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = rope.original_max_position_embeddings
    if rope.type == "yarn":
        params.update(beta_fast=rope.beta_fast, beta_slow=rope.beta_slow)
        if rope.attention_factor is not None:
            params["attention_factor"] = rope.attention_factor
    if rope.type == "llama3":
        params.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor)
    return params


def max_position_embeddings(rope: RopeConfig, seq_len: int) -> int:
    """transformers reads more than a length from this: dynamic NTK grows its base past it (so
    it must be the original length), and yarn checks it against original length × factor."""
    if rope.type == "dynamic":
        return rope.original_max_position_embeddings
    if rope.type == "yarn":
        return round(rope.original_max_position_embeddings * rope.factor)
    return seq_len


def export_architecture(model: ModelConfig, rope: RopeConfig) -> str:
    """The transformers class that computes what our model does; ConfigError (one line) if none does."""
    if rope.logn_attention:
        raise ConfigError(
            "rope.logn_attention: the checkpoint was trained with logn attention (rope=abf's default), which no "
            "transformers class implements; train with rope=yarn, or rope=abf rope.logn_attention=false, to export"
        )
    if model.nope_every and model.qk_norm:
        raise ConfigError(
            f"model.nope_every: no transformers class has both NoPE layers (nope_every={model.nope_every}) and QK-norm; "
            "train with model.qk_norm=false (SmolLM3ForCausalLM) or model.nope_every=0 (Qwen3ForCausalLM) to export"
        )
    if model.nope_every:
        return "SmolLM3ForCausalLM"
    return "Qwen3ForCausalLM" if model.qk_norm else "LlamaForCausalLM"


def hf_config_fields(model: ModelConfig, rope: RopeConfig, seq_len: int, vocab_size: int) -> dict[str, Any]:
    """Keyword arguments of the transformers config class for :func:`export_architecture`."""
    arch = export_architecture(model, rope)
    fields: dict[str, Any] = {
        "architectures": [arch],
        "vocab_size": vocab_size,
        "hidden_size": model.dim,
        "intermediate_size": model.resolved_ffn_dim(),
        "num_hidden_layers": model.n_layers,
        "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.n_kv_heads,
        "head_dim": model.resolved_head_dim(),
        "hidden_act": "silu",
        "rms_norm_eps": model.norm_eps,
        "tie_word_embeddings": model.tie_embeddings,
        "max_position_embeddings": max_position_embeddings(rope, seq_len),
        "rope_parameters": rope_parameters(rope),
        "attention_bias": False,
        "dtype": "float32",
    }
    if arch == "LlamaForCausalLM":
        fields["mlp_bias"] = False
    if arch == "SmolLM3ForCausalLM":
        fields["no_rope_layers"] = nope_layer_flags(model.nope_every, model.n_layers)
    return fields
