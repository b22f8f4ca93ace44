"""RoPE parity with Hugging Face transformers (v5 ``rope_parameters`` API).

Exported checkpoints run under transformers' RoPE, so every scaling is checked directly
against it: the init functions (``ROPE_INIT_FUNCTIONS`` and Qwen3's default), the rotary
module's cos/sin at offset positions, and ``apply_rotary_pos_emb``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from transformers import Qwen3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding, apply_rotary_pos_emb

from longtrain.config import RopeConfig
from longtrain.model.rope import RotaryEmbedding, apply_rope, rope_frequencies

# (name, RopeConfig, head_dim): every type, several lengths, bases and head sizes.
R = RopeConfig
LLAMA31 = dict(theta=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
CASES = [
    ("default-1e4-d64", R(), 64),
    ("default-5e5-d128", R(theta=5e5), 128),
    ("abf-5e5-d32", R(type="abf", theta=5e5), 32),
    ("linear-4-d64", R(type="linear", factor=4.0), 64),
    ("linear-16-5e5-d128", R(type="linear", theta=5e5, factor=16.0), 128),
    ("dynamic-4-512-d64", R(type="dynamic", factor=4.0), 64),
    ("dynamic-8-8192-5e5-d128", R(type="dynamic", theta=5e5, factor=8.0, original_max_position_embeddings=8192), 128),
    ("yarn-4-512-d32", R(type="yarn", factor=4.0), 32),
    ("yarn-4-512-d64", R(type="yarn", factor=4.0), 64),
    ("yarn-16-512-d128", R(type="yarn", factor=16.0), 128),
    ("yarn-4-8192-5e5-d128", R(type="yarn", theta=5e5, factor=4.0, original_max_position_embeddings=8192), 128),
    ("yarn-16-8192-5e5-d64", R(type="yarn", theta=5e5, factor=16.0, original_max_position_embeddings=8192), 64),
    ("yarn-40-4096-beta", R(type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=16, beta_slow=2),
     128),
    ("yarn-8-attnfactor", R(type="yarn", factor=8.0, attention_factor=1.25), 64),
    ("llama3-8-8192-5e5-d128", R(type="llama3", **LLAMA31), 128),
    ("llama3-4-512-d64", R(type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0), 64),
]
IDS = [c[0] for c in CASES]


def hf_config(cfg: RopeConfig, head_dim: int) -> Qwen3Config:
    """The Qwen3 config whose RoPE is ``cfg``, in transformers v5 ``rope_parameters`` form."""
    orig = cfg.original_max_position_embeddings
    params: dict = {"rope_type": "default" if cfg.type == "abf" else cfg.type, "rope_theta": cfg.theta}
    max_pos = orig  # dynamic: HF treats max_position_embeddings as the original length
    if cfg.type in ("linear", "dynamic"):
        params["factor"] = cfg.factor
    elif cfg.type == "yarn":
        params.update(
            factor=cfg.factor, original_max_position_embeddings=orig, beta_fast=cfg.beta_fast, beta_slow=cfg.beta_slow
        )
        if cfg.attention_factor is not None:
            params["attention_factor"] = cfg.attention_factor
        max_pos = int(orig * cfg.factor)
    elif cfg.type == "llama3":
        params.update(
            factor=cfg.factor,
            original_max_position_embeddings=orig,
            low_freq_factor=cfg.low_freq_factor,
            high_freq_factor=cfg.high_freq_factor,
        )
        max_pos = int(orig * cfg.factor)
    return Qwen3Config(
        vocab_size=32,
        hidden_size=2 * head_dim,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rope_parameters=params,
    )


def hf_frequencies(cfg: RopeConfig, head_dim: int, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    config = hf_config(cfg, head_dim)
    if cfg.type in ("default", "abf"):
        return Qwen3RotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[cfg.type](config, None, seq_len=seq_len)


def assert_inv_freq_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    # Relative: the slowest inverse frequencies are ~1e-7, where an absolute 1e-6 means nothing.
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("name,cfg,head_dim", CASES, ids=IDS)
def test_frequencies_match_hf(name: str, cfg: RopeConfig, head_dim: int) -> None:
    ours, ours_af = rope_frequencies(cfg, head_dim)
    ref, ref_af = hf_frequencies(cfg, head_dim)
    assert ours.shape == (head_dim // 2,)
    assert_inv_freq_close(ours, ref)
    assert ours_af == pytest.approx(ref_af, rel=1e-12)


@pytest.mark.parametrize("mult", [0.5, 1.0, 1.5, 4.0, 9.3])
def test_dynamic_tracks_sequence_length_like_hf(mult: float) -> None:
    for cfg, head_dim in ((CASES[5][1], 64), (CASES[6][1], 128)):
        seq_len = int(mult * cfg.original_max_position_embeddings)
        ours, _ = rope_frequencies(cfg, head_dim, seq_len)
        ref, _ = hf_frequencies(cfg, head_dim, seq_len)
        assert_inv_freq_close(ours, ref)
        base, _ = rope_frequencies(replace(cfg, type="default"), head_dim)
        if mult <= 1.0:  # within the original length: the plain table, bit for bit
            assert torch.equal(ours, base)
        else:  # beyond it the base grows, so every non-zero pair slows down
            assert (ours[1:] < base[1:]).all()


def test_yarn_matches_reference_formula() -> None:
    """The code form from REFERENCE.md, in float64, independent of both implementations."""
    d, b, s, L = 128, 5e5, 16.0, 8192
    cfg = RopeConfig(type="yarn", theta=b, factor=s, original_max_position_embeddings=L)
    fcd = lambda r: d * math.log(L / (2 * math.pi * r)) / (2 * math.log(b))  # noqa: E731
    low, high = max(math.floor(fcd(32)), 0), min(math.ceil(fcd(1)), d - 1)
    i = torch.arange(d // 2, dtype=torch.float64)
    ramp = ((i - low) / (high - low)).clamp(0, 1)
    expected = b ** (-2 * i / d) * ((1 - ramp) + ramp / s)
    ours, af = rope_frequencies(cfg, d)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-6, atol=0.0)
    assert af == pytest.approx(0.1 * math.log(s) + 1)


MODULE_CASES = [c for c in CASES if c[0] in (
    "default-5e5-d128", "abf-5e5-d32", "linear-4-d64", "dynamic-4-512-d64",
    "yarn-16-512-d128", "yarn-8-attnfactor", "llama3-8-8192-5e5-d128",
)]  # fmt: skip


@pytest.mark.parametrize("name,cfg,head_dim", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_module_and_apply_match_hf(name: str, cfg: RopeConfig, head_dim: int) -> None:
    torch.manual_seed(0)
    B, H, T = 2, 3, 64
    # Offset positions, as a later shard or a continued sequence sees them; the second row
    # starts further out so dynamic NTK (which follows max position) rescales.
    pos = torch.stack([torch.arange(1000, 1000 + T), torch.arange(2100, 2100 + T)])
    x = torch.zeros(B, T, head_dim)  # HF reads only device and dtype from it

    hf = Qwen3RotaryEmbedding(hf_config(cfg, head_dim))
    ref_cos, ref_sin = hf(x, pos)
    ours = RotaryEmbedding(cfg, head_dim)
    cos, sin = ours(pos)
    assert cos.shape == (B, T, head_dim) and cos.dtype == torch.float32
    torch.testing.assert_close(cos, ref_cos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sin, ref_sin, rtol=1e-5, atol=1e-5)

    q, k = torch.randn(B, H, T, head_dim), torch.randn(B, 1, T, head_dim)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, ref_cos, ref_sin)
    torch.testing.assert_close(apply_rope(q, cos, sin), ref_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(apply_rope(k, cos, sin), ref_k, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,cfg,head_dim", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_sharded_positions_match_full_sequence(name: str, cfg: RopeConfig, head_dim: int) -> None:
    """Zigzag context parallel (cp=2): rank r holds chunks r and 3-r at global positions."""
    T = 2048  # past the 512 original length, so dynamic actually rescales
    rope = RotaryEmbedding(cfg, head_dim)
    full = torch.arange(T)[None]
    cos, sin = rope(full, seq_len=T)
    chunks = torch.arange(T).chunk(4)
    for r in range(2):
        shard = torch.cat([chunks[r], chunks[3 - r]])[None]
        # The global length is passed so both ranks agree on the dynamic-NTK table.
        cos_r, sin_r = rope(shard, seq_len=T)
        assert torch.equal(cos_r, cos[:, shard[0]]) and torch.equal(sin_r, sin[:, shard[0]])


def test_relative_position_property() -> None:
    """<R(p)q, R(p')k> depends only on p - p': shifting both positions changes nothing."""
    torch.manual_seed(0)
    rope = RotaryEmbedding(RopeConfig(type="yarn", factor=4.0), 64)
    q, k = torch.randn(1, 1, 1, 64), torch.randn(1, 1, 1, 64)

    def score(p: int, pk: int) -> torch.Tensor:
        cq, sq = rope(torch.tensor([[p]]))
        ck, sk = rope(torch.tensor([[pk]]))
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(7, 3), score(1007, 1003), rtol=1e-4, atol=1e-4)


def test_apply_rope_keeps_dtype_and_norm() -> None:
    torch.manual_seed(0)
    rope = RotaryEmbedding(RopeConfig(), 64)
    cos, sin = rope(torch.arange(100, 116)[None])
    x = torch.randn(1, 4, 16, 64)
    y = apply_rope(x, cos, sin)
    # A rotation per pair: norms are preserved when the attention factor is 1.
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    y_bf16 = apply_rope(x.bfloat16(), cos, sin)
    assert y_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(y_bf16.float(), y, rtol=2e-2, atol=2e-2)


def test_inv_freq_is_a_non_persistent_buffer() -> None:
    rope = RotaryEmbedding(RopeConfig(type="yarn", factor=4.0), 64)
    assert "inv_freq" in dict(rope.named_buffers())
    assert "inv_freq" not in rope.state_dict()
    wrapper = torch.nn.Sequential(rope)
    assert wrapper.state_dict() == {}


def test_abf_is_default_with_a_raised_base_and_bad_inputs_raise() -> None:
    abf, _ = rope_frequencies(RopeConfig(type="abf", theta=5e5), 64)
    default, _ = rope_frequencies(RopeConfig(theta=5e5), 64)
    assert torch.equal(abf, default)
    with pytest.raises(ValueError, match="rope.type"):
        rope_frequencies(RopeConfig(type="ntk"), 64)
    with pytest.raises(ValueError, match="head_dim"):
        rope_frequencies(RopeConfig(), 63)


def test_logn_query_scale_matches_qwen() -> None:
    """Qwen's ``logn_list``: math.log(i, L) for 1-based position i > L, else 1 (float64 here)."""
    L = 512
    pos = torch.tensor([[0, 1, 510, 511, 512, 2047, 8191, 131071]])
    expected = torch.tensor([[math.log(p + 1, L) if p + 1 > L else 1.0 for p in pos[0].tolist()]], dtype=torch.float64)
    got = RotaryEmbedding(RopeConfig(type="abf", original_max_position_embeddings=L, logn_attention=True), 32).query_scale(pos)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)
    assert got[0, 6].item() == pytest.approx(13 / 9)  # 8K over 512: logits sharpened by 1.44
    assert RotaryEmbedding(RopeConfig(type="abf"), 32).query_scale(pos) is None
