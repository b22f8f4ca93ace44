"""Decoder-only GQA Transformer: pre-norm RMSNorm, SwiGLU, per-head QK-norm, RoPE.

The model knows nothing about distribution: attention goes through an injected
``attention_fn(q, k, v, scale, doc_ids) -> out`` (the local causal kernel unless
``parallel/parallelize.py`` sets ring attention), and positions come in explicitly, so a
context-parallel shard is just a shorter batch with non-contiguous global position ids.
Activation checkpointing, compile and FSDP2 are applied from outside, by the same
``parallelize``. ``doc_ids`` (None: no document masking) keeps
attention within packed documents.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from longtrain.attention.kernels import compute_dtype
from longtrain.attention.ring import ring_attention
from longtrain.config import ModelConfig, RopeConfig
from longtrain.model.rope import RotaryEmbedding, apply_rope
from longtrain.optim.loss import LossSums, TokenScores, chunked_cross_entropy, token_scores

AttentionFn = Callable[[Tensor, Tensor, Tensor, float, Optional[Tensor]], Tensor]


def local_causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, doc_ids: Optional[Tensor] = None) -> Tensor:
    """Whole sequence on one rank: the local kernel, causal (within documents given ``doc_ids``).

    The ring's op with no group, so activation checkpointing saves its output as it does
    the ring's (``parallel/activation_checkpointing.py``)."""
    return ring_attention(q, k, v, scale, None, doc_ids)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, use_rope: bool):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.resolved_head_dim()
        self.use_rope = use_rope
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)
        # Per-head QK-norm (Qwen3/OLMo 2): bounds attention logits, which keeps long-context
        # training stable when RoPE is rescaled.
        self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, attention_fn: AttentionFn,
        q_scale: Optional[Tensor] = None, doc_ids: Optional[Tensor] = None,
    ) -> Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        if self.use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if q_scale is not None:  # per position, so a context-parallel shard scales its own tokens
            q = q * q_scale[:, None, :, None].to(q.dtype)
        # One dtype into the kernels, the run's compute dtype: CUDA autocast runs QK-norm
        # (rms_norm, on its fp32 list) and so RoPE in fp32 while v leaves its linear layer
        # in bf16. Casting here rounds q and k once, after both.
        dtype = compute_dtype(v)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        out = attention_fn(q, k, v, 1.0 / math.sqrt(self.head_dim), doc_ids=doc_ids)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), in sequence tiles of ``tile_tokens`` when set.

    Tiled (ALST's TiledMLP): each tile is its own checkpoint, so the [T, ffn]
    intermediates exist one [tile, ffn] slice at a time, in the forward and when the
    backward recomputes them; only the tiles' inputs ([T, dim], a view of x) are kept.
    """

    def __init__(self, dim: int, hidden: int, tile_tokens: int = 0):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.tile_tokens = tile_tokens

    def forward(self, x: Tensor) -> Tensor:
        if not self.tile_tokens or x.shape[1] <= self.tile_tokens:
            return self._swiglu(x)
        tiles = x.split(self.tile_tokens, dim=1)
        return torch.cat([checkpoint(self._swiglu, tile, use_reentrant=False) for tile in tiles], dim=1)

    def _swiglu(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        # NoPE layers (iRoPE / SmolLM3): every nope_every-th layer attends without positions,
        # which helps length generalisation.
        use_rope = not (cfg.nope_every and (layer_id + 1) % cfg.nope_every == 0)
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg, use_rope)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.resolved_ffn_dim(), cfg.mlp_tile_tokens)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, attention_fn: AttentionFn,
        q_scale: Optional[Tensor] = None, doc_ids: Optional[Tensor] = None,
    ) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, attention_fn, q_scale, doc_ids)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RopeConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.tok_embeddings = nn.Embedding(vocab_size, cfg.dim)
        self.rotary = RotaryEmbedding(rope, cfg.resolved_head_dim())
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, vocab_size, bias=False)
        # Set by parallelize: ring attention when the sequence is sharded over cp ranks.
        self.attention_fn: AttentionFn = local_causal_attention
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std); residual output projections scaled by 1/sqrt(2·n_layers) (GPT-2)."""
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # RMSNorm weights keep their ones
            is_residual_out = name.endswith("attention.wo.weight") or name.endswith("feed_forward.w2.weight")
            nn.init.normal_(p, mean=0.0, std=residual_std if is_residual_out else std)

    def set_rope(self, rope: RopeConfig) -> None:
        """Rescale RoPE (a new stage): the tables are derived from config, never stored."""
        self.rotary = RotaryEmbedding(rope, self.cfg.resolved_head_dim()).to(self.tok_embeddings.weight.device)

    def output_weight(self) -> Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def hidden_states(self, input_ids: Tensor, position_ids: Tensor, doc_ids: Optional[Tensor] = None) -> Tensor:
        cos, sin = self.rotary(position_ids)
        q_scale = self.rotary.query_scale(position_ids)
        h = self.tok_embeddings(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, self.attention_fn, q_scale, doc_ids)
        return self.norm(h)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        labels: Optional[Tensor] = None,
        loss_chunk_size: int = 1024,
        doc_ids: Optional[Tensor] = None,
        z_loss: float = 0.0,
        scores: bool = False,
    ) -> Tensor | LossSums | TokenScores:
        """Logits [B, T, vocab] without labels; with labels, summed CE and z-loss terms, or
        with ``scores`` each labelled token's loss and argmax (evaluation, no [T, vocab]).

        ``doc_ids`` [B, T] (this shard's, nondecreasing along the sequence) masks attention
        to each token's own document; None attends across the whole packed sequence.

        The loss is computed inside forward so that FSDP2 keeps the (possibly tied) output
        weight unsharded while it is used, and in chunks so [T, vocab] logits never exist;
        ``z_loss`` is the z-loss coefficient in the returned sums' objective.
        """
        h = self.hidden_states(input_ids, position_ids, doc_ids)
        if labels is None:
            return h @ self.output_weight().t()
        if scores:
            return token_scores(h, self.output_weight(), labels, loss_chunk_size)
        return chunked_cross_entropy(h, self.output_weight(), labels, loss_chunk_size, z_loss)

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.tok_embeddings.weight.numel()
        return n
