"""Memory planner: the per-rank memory of a training step, before launching it, and the
communication of its context-parallel method.

    python -m longtrain.plan stage=extend_128k model=1b parallel.cp=8 [--device-memory 80GB] [--suggest] [--device cpu]
    python -m longtrain.plan stage=extend_128k --suggest --nodes 4 [--gpus-per-node 8] [--inter-gbps 400Gb/s]

Takes the same Hydra overrides as train.py, composes and validates the config the same
way (a bad override is the same one-line ``config error``, exit 2), and prints for every
stage the command would run, per rank:

- parameters, gradients and AdamW state (m and v, fp32), sharded by FSDP2 over all dp×cp
  ranks, plus the unsharded parameters FSDP2 holds while it computes (the root module for
  the whole step, a block and the one it prefetches);
- the activations each block saves for backward, by component, for this rank's tokens
  (seq_len × micro-batch / cp), the checkpointing mode and MLP tiling; those outside the
  blocks;
- the activations live at the peak of each phase: the saved set plus the loss chunk
  ([chunk, vocab] fp32 logits, made their gradient in place: the fused loss keeps
  d/d hidden states and d/d output weight for the backward), a checkpointed block rebuilt
  with its gradients, the attention kernel's or the ring's buffers (the K/V blocks in
  flight);
- the predicted peak, and whether it fits ``--device-memory``;
- under cp > 1, what ``parallel.cp_method`` sends per step (longtrain/plan_comm.py's model).

``--suggest`` lays the stage out over ``--world-size`` devices (or ``--nodes`` ×
``--gpus-per-node``): for each cp that fits (the config's when it sets one), the ring,
Ulysses and every hybrid split the model's heads allow, each with its cheapest
checkpointing that fits, its traffic and its predicted communication against the attention
compute; it picks the fastest that fits, and among equals the smallest cp.

The activation accounting is what the code saves, not a textbook estimate: each entry
below names the op that saves it, and tests/test_plan.py checks the sum against every
tensor autograd saves (``torch.autograd.graph.saved_tensors_hooks``) to the byte, and
under checkpointing (which hides its saves from those hooks) against the storages the
forward leaves alive. Under bf16 autocast (CUDA, run.dtype auto) linear layers save bf16
copies of their inputs and weights while the norms, RoPE and lse stay fp32; that
accounting is checked against CPU autocast, which runs the same ops (CUDA itself is not
measured here: no GPU).

The phases and the CUDA allocator's reserve are a model, not an exact count;
bench/plan_accuracy.py measures the whole prediction against peak RSS on the CPU.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field, replace
from typing import NoReturn, Optional

from hydra import initialize_config_dir

from longtrain.command_line import CONFIG_DIR, hydra_error_line
from longtrain.config import Config, ConfigError, stage_micro_batch
from longtrain.curriculum import compose_stage_configs, stages_to_run
from longtrain.data.tokenizer import build_tokenizer
from longtrain.hardware import autocast_dtype
from longtrain.parallel.parallelize import mixed_precision_policy
from longtrain.plan_comm import (
    ATTENTION_TFLOPS, GB, INTER_GBPS, INTER_LATENCY_US, INTRA_GBPS, INTRA_LATENCY_US, MODES, Candidate, Cluster,
    MethodCost, attention_shape, costs_text, format_table, kv_heads, method_cost, parse_rate, pick, positive, reasons,
    splits,
)
from longtrain.run_config import check_config

GiB = 1024**3
MiB = 1024**2
# CUDA: the context (kernels, cuBLAS workspaces, NCCL buffers) and the caching allocator's
# slack over the live tensors; neither exists for the CPU allocator, which gives freed
# memory back. Assumed, not measured (no GPU has been lent to this project yet).
CUDA_CONTEXT_BYTES = 1 * GiB
CUDA_ALLOCATOR_RESERVE = 0.10


@dataclass
class Row:
    name: str
    bytes: int
    note: str = ""


@dataclass
class MemoryPlan:
    """One stage on one rank: static state, activations, phases (loss, backward) and the peak."""

    stage: str
    seq_len: int
    micro_batch: int
    dp: int
    cp: int
    checkpointing: str
    device: str
    dtype: str
    tokens: int  # this rank's tokens per micro-batch
    n_layers: int
    mlp_tile: int  # tokens per MLP tile (model.mlp_tile_tokens), 0: the MLP is not tiled here
    fsdp_bf16: bool = False  # FSDP2's bf16 mixed-precision policy (parallel/parallelize.py): no autocast weight casts
    state: list[Row] = field(default_factory=list)  # parameters, gradients, optimizer, FSDP buffers
    per_block: list[Row] = field(default_factory=list)  # saved by each block (all alike)
    outside_blocks: list[Row] = field(default_factory=list)  # saved outside the blocks
    phases: list[Row] = field(default_factory=list)  # activation memory live at the loss and at each backward phase's peak
    overhead: list[Row] = field(default_factory=list)  # CUDA context + allocator reserve
    optimizer_step_extra: int = 0  # temporaries of the optimizer step (activations freed by then)
    cp_method: str = "ring"  # parallel.cp_method
    ulysses: int = 1  # its Ulysses degree (ParallelConfig.ulysses_degree)
    evaluation: list[Row] = field(default_factory=list)  # the gate's evaluation forward, live at its peaks

    @property
    def activations(self) -> int:
        return self.n_layers * sum(r.bytes for r in self.per_block) + sum(r.bytes for r in self.outside_blocks)

    @property
    def peak_phase(self) -> Row:
        return max(self.phases, key=lambda r: r.bytes)

    @property
    def live_peak(self) -> int:
        """The largest live tensor memory of the step: forward/backward or the optimizer step."""
        state = sum(r.bytes for r in self.state)
        return max(state + self.peak_phase.bytes, state + self.optimizer_step_extra)

    @property
    def peak(self) -> int:
        return self.live_peak + sum(r.bytes for r in self.overhead)

    @property
    def eval_peak(self) -> int:
        """The gate's evaluation (needle grid, suite, loss by position) on the same rank: the
        training state stays resident; no activations are saved (no grad)."""
        state = sum(r.bytes for r in self.state)
        return state + max(r.bytes for r in self.evaluation) + sum(r.bytes for r in self.overhead)


def model_shapes(cfg: Config, vocab_size: int) -> dict[str, int]:
    """Parameter counts: one block, its linear layers, the root (embeddings, final norm,
    untied head) and the whole model."""
    m = cfg.model
    hd = m.resolved_head_dim()
    d, f = m.dim, m.resolved_ffn_dim()
    attn = d * (m.n_heads + 2 * m.n_kv_heads) * hd + m.n_heads * hd * d
    norms = 2 * d + (2 * hd if m.qk_norm else 0)
    block = attn + 3 * d * f + norms
    embed = vocab_size * d
    root = embed + d + (0 if m.tie_embeddings else vocab_size * d)
    return {"block": block, "block_linear": attn + 3 * d * f, "root": root, "total": root + m.n_layers * block}


def mlp_tiled(cfg: Config, seq_tokens: int) -> bool:
    """Whether the MLP runs in sequence tiles (model.mlp_tile_tokens) on ``seq_tokens``, one
    sequence's tokens on this rank."""
    return 0 < cfg.model.mlp_tile_tokens < seq_tokens


def block_saved(cfg: Config, tokens: int, act: int, tiled: bool = False, fsdp_bf16: bool = False) -> list[Row]:
    """Bytes one block saves for backward with no checkpointing, by component (also what a
    checkpointed block rebuilds while its backward runs). ``tiled``: the MLP runs in
    checkpointed sequence tiles, which keep only their input, the MLP norm's output.

    ``act`` is the compute dtype's width (4 fp32, 2 under bf16 autocast). Norms and
    QK-norm upcast to fp32 (torch's composite rms_norm saves its fp32 input, its
    normalised output before the gain, and 1/rms); each linear saves its input (under
    autocast each one its own bf16 cast of it, and its bf16 weight copy); SiLU saves its
    input, the product both factors. ``fsdp_bf16``: FSDP2's mixed-precision policy hands the
    block bf16 parameters (CUDA, bf16, world > 1), so autocast casts no weight.
    """
    m = cfg.model
    d, f, hd = m.dim, m.resolved_ffn_dim(), m.resolved_head_dim()
    hq, hkv = m.n_heads * hd, m.n_kv_heads * hd
    t = tokens
    bf16 = act == 2
    norm = (2 * d + 1) * 4  # fp32 input (the residual stream), x/rms, 1/rms
    rows = [
        Row("residual + attention norm", t * norm, "RMSNorm: fp32 input, x/rms, 1/rms"),
        Row("q/k/v projection input", t * d * act * (3 if bf16 else 1), "one bf16 cast per linear" if bf16 else "shared by wq, wk, wv"),
    ]
    if m.qk_norm:
        rows.append(Row("q/k norm", t * (2 * (hq + hkv) + m.n_heads + m.n_kv_heads) * 4, "fp32 input, x/rms, 1/rms per head"))
    # RoPE multiplies by cos/sin tables (saved once per model, outside the blocks); the
    # rotated q and k are new tensors the kernel saves, cast to the compute dtype.
    rows += attention_saved(cfg, t, act) + [Row("residual + MLP norm", t * norm, "RMSNorm: fp32 input, x/rms, 1/rms")]
    if tiled:
        rows.append(Row("MLP tiles' input", t * d * 4, "the MLP norm's fp32 output, held by the tiles' checkpoints"))
    else:
        rows += [
            Row("MLP w1/w3 input", t * d * act * (2 if bf16 else 1), "one bf16 cast per linear" if bf16 else "shared by w1, w3"),
            Row("MLP w1 out, silu, w3 out, product", t * 4 * f * act, "SiLU input; both factors; w2 input"),
        ]
    if bf16 and not fsdp_bf16:  # a tile recasts the MLP's weights when it is recomputed
        weights = model_shapes(cfg, 0)["block_linear"] - (3 * d * f if tiled else 0)
        rows.append(Row("bf16 weight copies", weights * 2, "autocast's casts, saved by each linear"))
    return rows


def attention_saved(cfg: Config, tokens: int, act: int) -> list[Row]:
    """What the attention op saves for backward. Ulysses (and hybrid) run the kernel on the
    all-to-all's outputs, the whole sequence (of the ring group) for 1/U of the heads: as
    many q and out elements as the rank's own tokens hold, K/V repeated to max(Hkv, U)
    heads; out comes back to the sequence layout as a new tensor, wo's input. Assumed of
    the Ulysses implementation (not measured here): it keeps those all-to-all outputs for
    its backward rather than moving q, k, v and out again."""
    m = cfg.model
    hd, u = m.resolved_head_dim(), cfg.parallel.ulysses_degree()
    hq, hkv = m.n_heads * hd, kv_heads(m.n_kv_heads, u) * hd
    t = tokens
    if u == 1:
        return [Row("attention q, k, v", t * (hq + 2 * hkv) * act, "kernel inputs, after QK-norm and RoPE"),
                Row("attention out + lse", t * (hq * act + m.n_heads * 4), "out in compute dtype (also wo's input), lse fp32")]
    return [
        Row("attention q, k, v (head layout)", t * (hq + 2 * hkv) * act,
            f"kernel inputs after the all-to-all: {m.n_heads}/{u} heads, K/V as {kv_heads(m.n_kv_heads, u)}/{u}"),
        Row("attention out + lse (head layout)", t * (hq * act + m.n_heads * 4), "kernel output, lse fp32"),
        Row("attention out (sequence layout)", t * hq * act, "the all-to-all back: wo's input"),
    ]


def checkpointed_saved(cfg: Config, tokens: int, act: int, mode: str) -> list[Row]:
    """Bytes one checkpointed block keeps through the forward (parallel/activation_checkpointing.py):
    the block's input, held by the checkpoint, and the outputs its op-level policy saves:
    the attention op's out and lse (full), and every matmul's output too (selective)."""
    m = cfg.model
    d, f, hd = m.dim, m.resolved_ffn_dim(), m.resolved_head_dim()
    hq, hkv = m.n_heads * hd, m.n_kv_heads * hd
    t = tokens
    if cfg.parallel.ulysses_degree() == 1:
        attention = [Row("attention out + lse", t * (hq * act + m.n_heads * 4), "saved by the policy: the ring is never rerun")]
    else:  # the all-to-alls are not rerun either: their outputs are kept (attention_saved)
        attention = attention_saved(cfg, t, act)
    rows = [Row("block input", t * d * 4, "fp32 residual stream, held by the checkpoint"), *attention]
    if mode == "selective":
        rows.append(Row("matmul outputs", t * (hq + 2 * hkv + d + 2 * f + d) * act, "wq, wk, wv, wo, w1, w3, w2 outputs"))
    return rows


def recompute_extra(cfg: Config, tokens: int, act: int, mode: str, tiled: bool = False, fsdp_bf16: bool = False) -> int:
    """What a checkpointed block adds while its backward runs: its no-checkpointing saved
    set rebuilt, less what it kept, plus the kept matmul outputs that set does not hold."""
    if mode == "none":
        return 0
    m = cfg.model
    hq, hkv = m.n_heads * m.resolved_head_dim(), m.n_kv_heads * m.resolved_head_dim()
    full = sum(r.bytes for r in block_saved(cfg, tokens, act, tiled, fsdp_bf16))
    kept = sum(r.bytes for r in checkpointed_saved(cfg, tokens, act, mode))
    if mode == "full":  # input and the attention's tensors are in the plain saved set too
        return full - kept
    # Of the matmul outputs the plain set holds w1's and w3's, v, and (fp32 with QK-norm)
    # q and k, which the norms save; never wo's and w2's (they only enter a residual sum).
    # Tiled, the plain set holds no w1/w3 output either (the tiles recompute them).
    not_in_plain = 2 * m.dim + (0 if (m.qk_norm and act == 4) else hq + hkv) + (2 * m.resolved_ffn_dim() if tiled else 0)
    if cfg.parallel.ulysses_degree() > 1:  # the kernel saves the all-to-all's v, not wv's output
        not_in_plain += hkv
    return full - kept + tokens * not_in_plain * act


def outside_saved(cfg: Config, tokens: int, vocab_size: int, act: int) -> list[Row]:
    """Saved outside the blocks: token ids, RoPE tables, final norm, the loss's gradients."""
    m = cfg.model
    t = tokens
    rows = [Row("token ids", t * 8, "int64, saved by the embedding")]
    uses_rope = not m.nope_every or m.nope_every > 1
    if uses_rope:
        rows.append(Row("RoPE cos/sin", t * 2 * m.resolved_head_dim() * 4, "fp32, shared by every block"))
    if cfg.rope.logn_attention:
        rows.append(Row("logn query scale", t * 4, "fp32, shared by every block"))
    rows += [
        Row("final norm", t * (2 * m.dim + 1) * 4, "RMSNorm: fp32 input, x/rms, 1/rms"),
        # The fused loss computes its gradients in the forward and keeps them for the backward.
        Row("loss gradients", t * m.dim * act + vocab_size * m.dim * 4,
            f"d/d hidden states ({'bf16' if act == 2 else 'fp32'}), d/d output weight fp32"),
    ]
    return rows


def phases(cfg: Config, plan: "MemoryPlan", act: int, vocab_size: int) -> list[Row]:
    """Activation memory live at the peak of the loss and of each phase of the backward:
    the saved set, less what earlier backward nodes released, plus that phase's temporaries."""
    m = cfg.model
    d, f = m.dim, m.resolved_ffn_dim()
    t, saved = plan.tokens, plan.activations
    chunk = min(cfg.optim.loss_chunk_size, t)
    residual_grads = 2 * t * d * 4  # the gradient flowing down the residual stream, and its sum
    # The loss runs one chunk at a time, at the end of the forward (all saved, its gradient
    # buffers too): the chunk's fp32 logits, turned into their gradient in place; under bf16
    # the matmul's bf16 logits and the gradient's bf16 copy, bf16 copies of the hidden states
    # and the output weight, and each chunk's bf16 weight gradient before it is added in fp32.
    chunk_bytes = chunk * vocab_size * (4 + (4 if act == 2 else 0))
    casts = (t * d + 2 * vocab_size * d) * 2 if act == 2 else 0
    rows = [Row("loss (forward, gradients formed)", saved + chunk_bytes + casts,
                f"all saved + [{chunk}, {vocab_size}] logits fp32" + (" and bf16 copies" if act == 2 else ""))]
    # Its backward scales the gradients by the incoming one: dh fp32 joins the residual stream.
    rows.append(Row("loss backward", saved + residual_grads, "all saved + dh + residual gradients"))
    # By the last block's backward the final norm's and the loss's saved tensors are released.
    released = sum(r.bytes for r in plan.outside_blocks if r.name in ("final norm", "loss gradients"))
    # A checkpointed block first rebuilds its plain saved set (parallel/activation_checkpointing.py).
    block = saved - released + recompute_extra(cfg, t, act, plan.checkpointing, bool(plan.mlp_tile), plan.fsdp_bf16)
    if plan.mlp_tile:
        # One tile at a time: its plain saved set rebuilt (and its bf16 weight casts), then
        # its SwiGLU backward's gradients.
        tile = plan.micro_batch * plan.mlp_tile
        casts = 3 * d * f * 2 if act == 2 and not plan.fsdp_bf16 else 0
        rows.append(Row("last block, MLP tile backward", block + tile * (6 * f + 2 * d) * act + casts + residual_grads,
                        f"+ one {plan.mlp_tile}-token tile rebuilt and its gradients + residual gradients"))
    else:
        # SwiGLU backward peaks in the product's node: d(product) with d(silu) and d(w3 out)
        # while the product itself is already released (its w2 node ran): +2 [T, ffn].
        rows.append(Row("last block, MLP backward", block + t * 2 * f * act + residual_grads,
                        "+ 2 [T, ffn] gradients + residual gradients"))
    mlp = sum(r.bytes for r in block_saved(cfg, t, act, bool(plan.mlp_tile), plan.fsdp_bf16) if r.name.startswith(("residual + MLP", "MLP")))
    rows.append(attention_backward(cfg, plan, act, block - mlp + residual_grads))
    return rows


def attention_backward(cfg: Config, plan: "MemoryPlan", act: int, before: int) -> Row:
    """The last block's attention backward on top of ``before`` (what is live after its MLP's
    backward). Ulysses adds dout in the head layout and dq, dk, dv back in the sequence
    layout, counted as if live together with the kernel's or the ring's buffers (an upper
    bound: the all-to-all back runs after the ring's fp32 buffers are freed)."""
    m = cfg.model
    hd, u = m.resolved_head_dim(), cfg.parallel.ulysses_degree()
    ring = plan.cp // u
    hq, hkv, hkv_u = m.n_heads * hd, m.n_kv_heads * hd, kv_heads(m.n_kv_heads, u) * hd
    t = plan.tokens
    a2a = t * (2 * hq + 2 * hkv) * act if u > 1 else 0  # dout in, dq, dk, dv back
    if ring == 1:
        extra, note = t * (2 * hq + 2 * hkv_u) * act, "dout, dq, dk, dv"
    else:
        # Ring backward: own K/V stacked and the block arriving (compute dtype), dq fp32, this
        # block's dK/dV and the accumulator travelling with its block (fp32, send + receive).
        kv = 2 * hkv_u * t
        extra, note = t * hq * act + 2 * kv * act + t * hq * 4 + 3 * kv * 4, "dout, K/V send + receive, dq fp32, dK/dV fp32 ×3"
    name = "attention" if plan.cp == 1 else ("ring" if u == 1 else "Ulysses" if ring == 1 else "hybrid") + " attention"
    return Row(f"last block, {name} backward", before + extra + a2a,
               f"+ {note}" + (" + all-to-all dout, dq, dk, dv" if u > 1 else "") + " + residual gradients")


def evaluation(cfg: Config, plan: "MemoryPlan", act: int, vocab_size: int) -> list[Row]:
    """Memory live at the peaks of the evaluation forward (trainer/evaluator.py ``score_fn``):
    a block's transients while it runs, then the scoring of this rank's shard one chunk of
    [chunk, vocab] logits at a time, and the [B, T] per-token results gathered over cp."""
    m = cfg.model
    t, d, f = plan.tokens, m.dim, m.resolved_ffn_dim()
    chunk = min(cfg.optim.loss_chunk_size, t)
    residual = 2 * t * d * 4  # the block's input and output residual stream, fp32
    # SwiGLU: w1 and w3 outputs and their product at once (the largest block transient).
    block = Row("evaluation: a block's forward", residual + 3 * t * f * act, "residual in/out + 3 [T/cp, ffn], nothing saved")
    # Final hidden states, the labelled rows in the compute dtype, one chunk's logits (fp32,
    # and the bf16 matmul output under bf16), and loss fp32 + argmax int64 per token of the
    # whole sequence: cp shards gathered and their un-sharded copy.
    results = 2 * plan.micro_batch * plan.seq_len * (4 + 8)
    scoring = t * d * (4 + act) + chunk * vocab_size * (4 + (2 if act == 2 else 0)) + results
    rows = [block, Row("evaluation: scoring", scoring,
                       f"hidden states + [{chunk}, {vocab_size}] logits fp32 + [B, T] loss and argmax, gathered")]
    if plan.cp > 1:
        rows.insert(1, attention_forward(cfg, plan, act, residual))
    return rows


def attention_forward(cfg: Config, plan: "MemoryPlan", act: int, before: int) -> Row:
    """A block's context-parallel attention in a forward that saves nothing (evaluation):
    q, k, v and out, with the ring's two K/V blocks in flight and its fp32 out and lse
    accumulators, and Ulysses' copies in the head layout (both layouts counted as live)."""
    m = cfg.model
    hd, u = m.resolved_head_dim(), cfg.parallel.ulysses_degree()
    hq, hkv, hkv_u = m.n_heads * hd, m.n_kv_heads * hd, kv_heads(m.n_kv_heads, u) * hd
    t = plan.tokens
    live, notes = t * (2 * hq + 2 * hkv) * act, ["q, k, v, out"]
    if u > 1:
        live += t * (2 * hq + 2 * hkv_u) * act
        notes.append("the same in the head layout")
    if plan.cp > u:
        live += 2 * 2 * hkv_u * t * act + t * (hq + m.n_heads) * 4
        notes.append("K/V send + receive, out + lse fp32")
    return Row("evaluation: a block's attention", before + live, "residual in/out + " + ", ".join(notes))


def plan_stage(cfg: Config, vocab_size: int, device: str, checkpointing: Optional[str] = None) -> MemoryPlan:
    """The memory plan of one rank for one validated stage config (every rank holds as many
    tokens: zigzag chunks are equal), with its checkpointing or ``checkpointing``."""
    mode = checkpointing or cfg.model.activation_checkpointing
    p = cfg.parallel
    world = p.dp * p.cp
    micro = cfg.stage.micro_batch_size
    tokens = cfg.stage.seq_len * micro // p.cp
    dtype = "float32" if autocast_dtype(cfg.run.dtype, device) is None else "bfloat16"  # bf16 is the only autocast dtype
    act = 2 if dtype == "bfloat16" else 4
    shapes = model_shapes(cfg, vocab_size)
    n = shapes["total"]
    shard = -(-n // world)  # FSDP2 pads every parameter's dim 0 to a multiple of the world size
    tiled = mlp_tiled(cfg, cfg.stage.seq_len // p.cp)
    plan = MemoryPlan(cfg.stage.name, cfg.stage.seq_len, micro, p.dp, p.cp, mode, device, dtype, tokens,
                      cfg.model.n_layers, cfg.model.mlp_tile_tokens if tiled else 0,
                      cp_method=p.cp_method, ulysses=p.ulysses_degree(),
                      fsdp_bf16=mixed_precision_policy(cfg.run.dtype, device) is not None and world > 1)
    plan.state = [
        Row("parameters", shard * 4, f"fp32, {n / 1e6:.1f}M" + (f" sharded over {world}" if world > 1 else "")),
        Row("gradients", shard * 4, "fp32" + (", sharded" if world > 1 else "")),
        Row("optimizer state", 2 * shard * 4, "AdamW m + v, fp32" + (", sharded" if world > 1 else "")),
    ]
    if world > 1:
        # FSDP2 keeps the root (embeddings, final norm, head) unsharded for the whole step and
        # all-gathers a block while the one before computes (forward and backward prefetch);
        # the block's unsharded gradients wait for their reduce-scatter.
        # Under the mixed-precision policy the gathered parameters and their gradients are
        # bf16 (gradients are cast to fp32 only for the reduce-scatter).
        width = 2 if plan.fsdp_bf16 else 4
        plan.state.append(Row("FSDP2 unsharded", (shapes["root"] + 3 * shapes["block"]) * width,
                              f"root + 2 blocks' parameters + 1 block's gradients, {'bf16' if plan.fsdp_bf16 else 'fp32'}"))
    plan.per_block = block_saved(cfg, tokens, act, tiled, plan.fsdp_bf16) if mode == "none" else checkpointed_saved(cfg, tokens, act, mode)
    plan.outside_blocks = outside_saved(cfg, tokens, vocab_size, act)
    plan.phases = phases(cfg, plan, act, vocab_size)
    plan.evaluation = evaluation(cfg, plan, act, vocab_size)
    # foreach AdamW: a temporary the size of the (local) parameters next to the state.
    plan.optimizer_step_extra = 2 * shard * 4
    if device == "cuda":
        plan.overhead = [
            Row("CUDA context", CUDA_CONTEXT_BYTES, "kernels, cuBLAS, NCCL (assumed)"),
            Row("allocator reserve", int(CUDA_ALLOCATOR_RESERVE * plan.live_peak), f"{CUDA_ALLOCATOR_RESERVE:.0%} caching slack (assumed)"),
        ]
    return plan


def _size(n: int) -> str:
    return f"{n / GiB:8.2f} GiB" if n >= GiB else f"{n / MiB:8.1f} MiB"


def format_plan(plan: MemoryPlan, device_memory: Optional[int] = None) -> str:
    lines = [
        f"stage {plan.stage}: {plan.seq_len} tokens × micro-batch {plan.micro_batch}, dp={plan.dp} × cp={plan.cp}"
        + (f" ({plan.cp_method} {plan.ulysses}×{plan.cp // plan.ulysses})" if plan.cp > 1 else "") + ", "
        f"{plan.tokens} tokens per rank, checkpointing {plan.checkpointing}"
        + (f", MLP in {plan.mlp_tile}-token tiles" if plan.mlp_tile else "") + f", {plan.dtype} on {plan.device}",
    ]

    def rows(title: str, items: list[Row], indent: str = "  ") -> None:
        lines.append(f"  {title}")
        for r in items:
            lines.append(f"{indent}  {r.name:<38}{_size(r.bytes)}   {r.note}")

    rows("state (per rank)", plan.state)
    rows(f"activations saved by each block (× {plan.n_layers})", plan.per_block)
    per_block = sum(r.bytes for r in plan.per_block)
    lines.append(f"    {'per block':<38}{_size(per_block)}   × {plan.n_layers} = {_size(per_block * plan.n_layers).strip()}")
    rows("activations saved outside the blocks", plan.outside_blocks)
    lines.append(f"    {'all activations':<38}{_size(plan.activations)}")
    rows("activations live at each phase's peak (the largest sets the peak)", plan.phases)
    if plan.overhead:
        rows("device overhead", plan.overhead)
    verdict = ""
    if device_memory is not None:
        verdict = f"  → {'fits' if plan.peak <= device_memory else 'does NOT fit'} {_device(device_memory)}"
    lines.append(f"  predicted peak per rank{'':<15}{_size(plan.peak)}{verdict}")
    rows("the gate's evaluation (no [T, vocab] logits; state as above)", plan.evaluation)
    eval_verdict = f"  ({'within' if plan.eval_peak <= plan.peak else 'ABOVE'} the training step's)"
    lines.append(f"  evaluation peak per rank{'':<14}{_size(plan.eval_peak)}{eval_verdict}")
    return "\n".join(lines)


def _device(size: int) -> str:
    return f"{size / 1e9:g} GB ({size / GiB:.1f} GiB)"


def parse_size(text: str) -> int:
    """'80GB' (10^9), '80GiB' (2^30), '512MB', plain bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"--device-memory: {text!r} is not a size; valid: e.g. 80GB, 141GB, 24GiB")
    unit = (m.group(2) or "B").upper()
    power = "BKMGT".index(unit[0]) if unit != "B" else 0
    return int(float(m.group(1)) * (1024 if "I" in unit else 1000) ** power)


def layout(cfg: Config, world: int, cp: int, method: str = "ring", ulysses: int = 1) -> Config:
    """``cfg`` over ``world`` ranks with this cp and method (dp the rest), its micro-batch
    derived again (it depends on dp)."""
    degree = ulysses if method == "hybrid" else None  # the config names a degree for hybrid only
    trial = replace(cfg, parallel=replace(cfg.parallel, dp=world // cp, cp=cp, cp_method=method, ulysses=degree))
    return replace(trial, stage=stage_micro_batch(trial))


def cp_choices(cfg: Config, world: int) -> list[int]:
    """The cps (powers of 2 dividing ``world``) at which the stage's layout is valid."""
    found = []
    for cp in (2**i for i in range(world.bit_length())):
        if world % cp == 0:
            try:
                check_config(layout(cfg, world, cp), world)
            except ConfigError:
                continue
            found.append(cp)
    return found


def cheapest_fit(cfg: Config, vocab_size: int, device: str, device_memory: int) -> tuple[MemoryPlan, bool]:
    """The plan of the first checkpointing mode (in MODES order) that fits, else of the last."""
    for mode in MODES:
        plan = plan_stage(cfg, vocab_size, device, mode)
        if plan.peak <= device_memory:
            return plan, True
    return plan, False


def suggest(cfg: Config, vocab_size: int, device: str, device_memory: int, world: int) -> Optional[tuple[int, str, MemoryPlan]]:
    """The smallest cp, then the cheapest checkpointing mode, whose ring plan fits
    ``device_memory``; None if nothing does."""
    for cp in cp_choices(cfg, world):
        plan, fits = cheapest_fit(layout(cfg, world, cp), vocab_size, device, device_memory)
        if fits:
            return cp, plan.checkpointing, plan
    return None


def method_candidates(cfg: Config, vocab_size: int, device: str, device_memory: int, world: int,
                      cluster: Cluster, cps: list[int]) -> tuple[list[Candidate], list[str]]:
    """Every method at each cp in ``cps`` (plan_comm.splits) with its cheapest fitting
    checkpointing and its cost per step; and, one line each, those the config refuses."""
    rows: list[Candidate] = []
    refused: dict[str, list[str]] = {}  # the config's reason → the layouts it refuses
    for cp in cps:
        for method, u in splits(cp, cfg.model.n_heads):
            trial = layout(cfg, world, cp, method, u if method == "hybrid" else 1)
            try:
                check_config(trial, world)
            except ConfigError as e:
                refused.setdefault(str(e), []).append(f"{method} {u}×{cp // u}")
                continue
            plan, fits = cheapest_fit(trial, vocab_size, device, device_memory)
            rows.append(Candidate(trial.parallel.dp, layout_cost(trial, plan, cluster), plan.checkpointing, plan.peak, fits))
    return rows, [f"{', '.join(layouts)}: {reason}" for reason, layouts in refused.items()]


def layout_cost(cfg: Config, plan: MemoryPlan, cluster: Cluster) -> MethodCost:
    """The communication and attention time of a validated config's cp method, per step."""
    p = cfg.parallel
    micro_batches = cfg.stage.global_batch_size // (p.dp * cfg.stage.micro_batch_size)
    u = p.ulysses_degree()
    shape = attention_shape(cfg, 2 if plan.dtype == "bfloat16" else 4)
    return method_cost(shape, p.cp_method, u, p.cp // u, micro_batches, cluster)


def format_suggestion(cfg: Config, vocab_size: int, device: str, device_memory: int, world: int, cluster: Cluster) -> list[str]:
    """--suggest: the methods table at the config's cp (every valid cp when it is 1) and the pick."""
    cps = [cfg.parallel.cp] if cfg.parallel.cp > 1 else cp_choices(cfg, world)
    rows, refused = method_candidates(cfg, vocab_size, device, device_memory, world, cluster, cps)
    lines = [f"  context parallelism on {world} devices ({cluster.describe()}), per rank and optimizer step:"]
    lines += [f"    {line}" for line in format_table(rows)] if rows else []
    lines += [f"    not valid: {r}" for r in refused]
    if not rows:
        return [*lines, f"  suggest: no valid layout on {world} devices (cp in {cps})"]
    best = pick(rows)
    if not best.fits:
        return [*lines, f"  suggest: nothing fits {_device(device_memory)} on {world} devices (cp in {cps}, modes "
                        f"{', '.join(MODES)}); the smallest peak is {_size(best.peak).strip()}: {best.overrides()}"]
    lines.append(f"  suggest: {best.overrides()} (peak {_size(best.peak).strip()} of {_device(device_memory)} on {world} devices)")
    return lines + [f"    {line}" for line in reasons(best, rows)]


def cluster_args(args: argparse.Namespace) -> Cluster:
    """The interconnect the flags describe (ConfigError on a bad one)."""
    positive(args.gpus_per_node, "--gpus-per-node")
    positive(args.intra_latency_us, "--intra-latency-us")
    positive(args.inter_latency_us, "--inter-latency-us")
    positive(args.attention_tflops, "--attention-tflops")
    return Cluster(args.gpus_per_node, parse_rate(args.intra_gbps, "--intra-gbps"), parse_rate(args.inter_gbps, "--inter-gbps"),
                   args.intra_latency_us * 1e-6, args.inter_latency_us * 1e-6, args.attention_tflops * 1e12)


def world_size(args: argparse.Namespace, cfg: Config) -> int:
    """--nodes × --gpus-per-node, else --world-size, else the config's dp × cp."""
    if args.world_size is not None:
        positive(args.world_size, "--world-size")
    if args.nodes is None:
        return args.world_size or cfg.parallel.dp * cfg.parallel.cp
    positive(args.nodes, "--nodes")
    world = args.nodes * args.gpus_per_node
    if args.world_size is not None and args.world_size != world:
        raise ConfigError(f"--world-size: {args.world_size} is not --nodes × --gpus-per-node = {world}")
    return world


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """A bad flag is one line, like a bad override (argparse would print its usage too)."""
        print(f"config error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: Optional[list[str]] = None) -> int:
    parser = _Parser(
        prog="python -m longtrain.plan",
        description="Per-rank memory of a training step for train.py's overrides (see longtrain/plan.py).",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    parser.add_argument("--device-memory", default="80GB", help="memory per device, e.g. 80GB (default), 141GB")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="the device to plan for (default: run.device, and cuda for auto)")
    parser.add_argument("--world-size", type=int, default=None, help="--suggest: devices to lay out (default dp×cp)")
    parser.add_argument("--suggest", action="store_true",
                        help="compare ring, Ulysses and hybrid at each valid cp (or the config's) and pick one")
    cluster = parser.add_argument_group("the cluster (communication model, longtrain/plan_comm.py)")
    cluster.add_argument("--nodes", type=int, default=None, help="nodes; the world size is nodes × --gpus-per-node")
    cluster.add_argument("--gpus-per-node", type=int, default=8, help="default 8")
    cluster.add_argument("--intra-gbps", default=f"{INTRA_GBPS:g}", help="in-node bandwidth per GPU and direction, GB/s "
                         "(or 400Gb/s in bits); default NVLink 450")
    cluster.add_argument("--inter-gbps", default=f"{INTER_GBPS:g}", help="between nodes, per GPU; default 50 GB/s (IB 400Gb/s)")
    cluster.add_argument("--intra-latency-us", type=float, default=INTRA_LATENCY_US,
                         help=f"per hop or all-to-all in a node; default {INTRA_LATENCY_US:g}")
    cluster.add_argument("--inter-latency-us", type=float, default=INTER_LATENCY_US,
                         help=f"across nodes; default {INTER_LATENCY_US:g}")
    cluster.add_argument("--attention-tflops", type=float, default=ATTENTION_TFLOPS,
                         help=f"achieved by the attention kernel; default {ATTENTION_TFLOPS:g}")
    args = parser.parse_intermixed_args(argv)  # flags and overrides in any order
    try:
        device_memory = parse_size(args.device_memory)
        network = cluster_args(args)
        stages = compose(args.overrides)
        worlds = [world_size(args, cfg) for cfg in stages]
        vocab = vocab_size(stages[0])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    for cfg, world in zip(stages, worlds):
        device = args.device or ("cpu" if cfg.run.device == "cpu" else "cuda")
        plan = plan_stage(cfg, cfg.model.vocab_size or vocab, device)
        print(format_plan(plan, device_memory))
        if cfg.parallel.cp > 1:
            cost = layout_cost(cfg, plan, network)
            print(f"  communication per rank and step ({cost.label} {cost.ulysses}×{cost.ring}, {network.gpus_per_node} "
                  f"GPUs per node): {cost.bytes / GB:.2f} GB sent, {cost.hops:,} hops; " + "; ".join(costs_text(cost)))
        if args.suggest:
            print("\n".join(format_suggestion(cfg, cfg.model.vocab_size or vocab, device, device_memory, world, network)))
        print()
    return 0


def compose(overrides: list[str]) -> list[Config]:
    """The stages train.py would run for these overrides (all, or the one ``stage=``
    names), validated as train.py validates them; Hydra's errors as one ConfigError line."""
    chosen = next((o.split("=", 1)[1] for o in overrides if o.startswith("stage=")), None)
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            stages = compose_stage_configs(overrides, only=chosen)
    except ConfigError:
        raise
    except Exception as e:  # Hydra's composition and parse errors
        line = hydra_error_line(e)
        if line is None:
            raise
        raise ConfigError(line) from None
    return stages_to_run(stages, chosen)  # checked as they were loaded


def vocab_size(cfg: Config) -> int:
    return build_tokenizer(cfg.tokenizer).vocab_size


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
