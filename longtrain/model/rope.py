"""Rotary position embeddings (RoPE) and the scalings used to extend context.

Every scaling reproduces Hugging Face transformers v5 (``modeling_rope_utils.py`` and the
model classes' ``compute_default_rope_parameters``) op for op in float32, so an exported
checkpoint sees the same angles in ``transformers`` as it did in training.

- ``default`` / ``abf``: ``theta^(-2i/d)``. ABF (Xiong et al. 2023) is the same formula
  with a raised base; the separate name only documents intent in stage configs.
- ``linear`` (position interpolation): inv_freq / factor.
- ``dynamic`` (NTK): the base grows with the current length T once T > L.
- ``yarn``: per-pair blend of interpolation and extrapolation over a linear ramp, plus an
  attention factor on cos/sin.
- ``llama3``: wavelength bands: short ones kept, long ones divided by factor, smooth between.

Any type can add ``logn_attention`` (Qwen): queries past the original length scaled by
log_L(p + 1), the attention temperature that plain base raises (abf) lack and YaRN builds
into its attention factor.

Tables are never stored: ``inv_freq`` is a non-persistent buffer derived from the config,
so changing RoPE between curriculum stages is a config change, not a checkpoint surgery.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from longtrain.config import RopeConfig


def _default_inv_freq(base: float, dim: int, device: Optional[torch.device] = None) -> Tensor:
    # Same ops as HF (int64 arange → float32, python-float base): bit-identical tables.
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (base**exponent)


def _yarn(cfg: RopeConfig, dim: int, device: Optional[torch.device]) -> tuple[Tensor, float]:
    base, factor, orig = cfg.theta, cfg.factor, cfg.original_max_position_embeddings

    # Default attention factor from the YaRN paper, sqrt(1/t) = 0.1·ln(s) + 1 (1 when s ≤ 1).
    # HF's DeepSeek-style mscale/mscale_all_dim ratio is not exposed: we match its default.
    if cfg.attention_factor is not None:
        attention_factor = float(cfg.attention_factor)
    else:
        attention_factor = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0

    def correction_dim(num_rotations: float) -> float:
        # Pair index i whose wavelength 2π·b^(2i/d) turns `num_rotations` times over the
        # original context: i = d·ln(L/(2πr)) / (2·ln b).
        return dim * math.log(orig / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    # HF's default truncate=True: integer ramp ends. HF clamps to dim-1 although pair indices
    # stop at dim/2-1; kept, since it moves the ramp's slope when high lands past the end.
    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid 0/0, as HF does
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    ramp = ramp.to(device)

    pos_freqs = base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    extrapolation = 1.0 / pos_freqs  # fast pairs (ramp 0): untouched
    interpolation = 1.0 / (factor * pos_freqs)  # slow pairs (ramp 1): divided by s
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, attention_factor


def _llama3(cfg: RopeConfig, dim: int, device: Optional[torch.device]) -> Tensor:
    inv_freq = _default_inv_freq(cfg.theta, dim, device)
    factor, low, high = cfg.factor, cfg.low_freq_factor, cfg.high_freq_factor
    orig = cfg.original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = orig / low, orig / high

    wavelen = 2 * math.pi / inv_freq
    # Wavelengths longer than the original context never completed a turn in training:
    # interpolate them fully. Short ones were seen many times: keep them.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (orig / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_frequencies(
    cfg: RopeConfig,
    head_dim: int,
    seq_len: int | None = None,
    device: Optional[torch.device] = None,
) -> tuple[Tensor, float]:
    """Inverse frequencies (float32, [head_dim // 2]) and the factor that multiplies cos/sin.

    ``seq_len`` only matters for ``dynamic``: the current (global) sequence length; below
    or at the original length the plain table is returned.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    if cfg.type in ("default", "abf"):
        return _default_inv_freq(cfg.theta, head_dim, device), 1.0
    if cfg.type == "linear":
        # Scaling frequencies == scaling positions (angles are position·inv_freq).
        return _default_inv_freq(cfg.theta, head_dim, device) / cfg.factor, 1.0
    if cfg.type == "dynamic":
        orig = cfg.original_max_position_embeddings
        t = max(seq_len if seq_len is not None else orig, orig)
        # HF's NTK-aware base: b·((s·T/L) − (s−1))^(d/(d−2)); equals b at T = L, so the
        # table is continuous as the sequence grows past the original length.
        base = cfg.theta * ((cfg.factor * t / orig) - (cfg.factor - 1)) ** (head_dim / (head_dim - 2))
        return _default_inv_freq(base, head_dim, device), 1.0
    if cfg.type == "yarn":
        return _yarn(cfg, head_dim, device)
    if cfg.type == "llama3":
        return _llama3(cfg, head_dim, device), 1.0
    raise ValueError(f"unknown rope.type {cfg.type!r}")


class RotaryEmbedding(nn.Module):
    """cos/sin tables at explicit (global) positions, rotate-half layout, float32.

    Positions come from the caller rather than ``arange(T)`` so that a context-parallel
    shard (zigzag chunks, non-contiguous) gets exactly the angles of the full sequence.
    """

    def __init__(self, cfg: RopeConfig, head_dim: int):
        super().__init__()
        self.cfg = cfg
        self.head_dim = head_dim
        inv_freq, self.attention_factor = rope_frequencies(cfg, head_dim)
        # Non-persistent: derived from config, so checkpoints stay valid across RoPE changes.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: Tensor, seq_len: int | None = None) -> tuple[Tensor, Tensor]:
        """``position_ids`` [B, T] → (cos, sin), each [B, T, head_dim] float32.

        ``seq_len`` (dynamic only) overrides ``max(position_ids) + 1``. Pass the *global*
        length when sequence-sharded: each zigzag shard sees a different maximum position,
        and the ranks must agree on one table.
        """
        inv_freq = self.inv_freq
        if self.cfg.type == "dynamic":
            if seq_len is None:
                seq_len = int(position_ids.max()) + 1  # host sync; only dynamic pays it
            if seq_len > self.cfg.original_max_position_embeddings:
                inv_freq, _ = rope_frequencies(self.cfg, self.head_dim, seq_len, device=inv_freq.device)
        # float32 angles like HF; an elementwise product is left alone by autocast.
        freqs = position_ids[..., None].float() * inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout: pair i is (i, i + D/2)
        return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor

    def query_scale(self, position_ids: Tensor) -> Optional[Tensor]:
        """[B, T] factors for the queries (``rope.logn_attention``), or None."""
        if not self.cfg.logn_attention:
            return None
        return logn_query_scale(position_ids, self.cfg.original_max_position_embeddings)


def logn_query_scale(position_ids: Tensor, original_length: int) -> Tensor:
    """Qwen's logn attention: the query at position p scaled by max(1, log_L(p + 1)).

    Softmax over n keys flattens as n grows; multiplying the logits by log n / log L keeps
    its sharpness at what the model learned at length L (Chiang & Cholak 2022). Positions
    within the original length get exactly 1, so short contexts are untouched.
    """
    return (torch.log1p(position_ids.float()) / math.log(original_length)).clamp(min=1.0)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` [B, H, T, D] by (cos, sin) [B, T, D]; at least float32 math, result in x.dtype.

    Under bf16 the two products and the sum would each round; upcasting rounds once, at
    the end, and costs nothing next to attention.
    """
    dtype = x.dtype
    x = x.to(torch.promote_types(dtype, torch.float32))
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    return (x * cos + rotate_half(x) * sin).to(dtype)
