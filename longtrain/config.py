"""Typed config schema and value checks; imports nothing from longtrain.

Hydra composes YAML from ``configs/``; :func:`merge_config` merges the result into these
dataclasses (catching wrong types and unknown keys), :func:`resolve_stage` derives the
stage's RoPE and micro-batch, and :func:`validate` checks every value that a type cannot
express, one check function per section. All raise :class:`ConfigError` with one line
that names the offending key and what would be valid, before any compute starts. What
needs the world outside the config is checked above this module: the layout over the
ranks by ParallelDims, the files and folders a config names by longtrain/run_config.py,
what a command runs as a whole (run folders, tokenizer, device) by longtrain/preflight.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A bad config value; the message is one line naming the key."""


ROPE_TYPES = ("default", "abf", "linear", "dynamic", "yarn", "llama3")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")
SOURCES = ("stdlib_code", "local", "hf")
TOKENIZERS = ("byte", "hf")
AC_MODES = ("none", "full", "selective")  # model.activation_checkpointing
DTYPES = ("auto", "float32", "bfloat16")
CP_METHODS = ("ring", "ulysses", "hybrid")  # parallel.cp_method


@dataclass
class ModelConfig:
    name: str = "tiny"
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 2
    head_dim: Optional[int] = None  # default: dim // n_heads
    ffn_dim: Optional[int] = None  # default: SwiGLU 8/3·dim rounded up to a multiple of 64
    qk_norm: bool = True
    nope_every: int = 0  # every k-th layer (k, 2k, ...) skips RoPE; 0 = RoPE everywhere
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    vocab_size: Optional[int] = None  # default: the tokenizer's
    hf_path: Optional[str] = None  # model=hf: every field above (and rope.theta) from this local HF folder
    # Activation checkpointing per block (parallel/activation_checkpointing.py): none keeps every
    # activation; full recomputes all but the attention output (never the ring's P2P);
    # selective also keeps matmul outputs and recomputes only norms, RoPE and pointwise ops.
    activation_checkpointing: str = "none"
    # > 0: the SwiGLU MLP runs in sequence tiles of this many tokens, each checkpointed
    # (ALST's tiled MLP), so its [T, ffn] intermediates exist one tile at a time. 0 = whole.
    mlp_tile_tokens: int = 0
    # torch.compile each transformer block (torchtitan's per-block compile): inductor fuses
    # the norms, RoPE, SwiGLU and residual adds around the attention op. The first step of
    # each new sequence length pays the compilation (seconds to a minute on a CPU).
    compile: bool = False

    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    def resolved_ffn_dim(self) -> int:
        if self.ffn_dim is not None:
            return self.ffn_dim
        return -(-(8 * self.dim // 3) // 64) * 64


@dataclass
class RopeConfig:
    """RoPE and its scalings, named as in transformers' ``rope_parameters``."""

    type: str = "default"
    theta: float = 10000.0
    factor: Optional[float] = 1.0  # null: stage.seq_len / original_max_position_embeddings
    original_max_position_embeddings: int = 8192  # the pretraining length
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: Optional[float] = None  # yarn: default 0.1·ln(factor)+1
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    logn_attention: bool = False  # queries past original_max_position_embeddings scaled by log_L(p+1)

    def label(self) -> str:
        """Short and human: ``abf θ=500000``, ``yarn ×4``."""
        return self.type + (f" θ={self.theta:g}" if self.type in ("default", "abf") else f" ×{self.factor:g}" if self.factor else " ×auto")


@dataclass
class TokenizerConfig:
    type: str = "byte"
    path: Optional[str] = None  # local Hugging Face tokenizer folder for type=hf


@dataclass
class DataConfig:
    source: str = "stdlib_code"
    path: Optional[str] = None  # glob for source=local; dataset path/name for source=hf
    name: Optional[str] = None  # hf config name
    text_field: str = "text"
    val_percent: float = 5.0
    max_docs: Optional[int] = None  # cap on documents read (quick runs)
    seed: int = 1234
    document_masking: bool = False  # a token attends only to earlier tokens of its own document
    reset_positions: bool = False  # positions restart at 0 at each document (RoPE per document)
    prepared: Optional[str] = None  # prepared shards folder (null: data/<source>-<tokenizer>-<plan hash>)


@dataclass
class MixSourceConfig:
    """One weighted source of a stage's text: prepared train documents within a length range."""

    name: str = "corpus"
    weight: float = 1.0
    prepared: Optional[str] = None  # a prepared folder (python -m longtrain.data.prepare); null: the run's data
    min_doc_tokens: int = 0  # documents shorter than this are left out (BOS/EOS included)
    max_doc_tokens: Optional[int] = None  # and longer than this


@dataclass
class StageConfig:
    name: str = "pretrain"
    seq_len: int = 512
    steps: int = 1000
    global_batch_size: int = 8  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 8  # sequences per forward on one rank
    warmup_steps: int = 50
    decay_fraction: float = 0.2
    decay_shape: str = "1-sqrt"
    final_lr_ratio: float = 0.0
    long_doc_share: float = 0.0  # share of samples cut from documents at least seq_len long
    retrieval_share: float = 0.0  # share of synthetic retrieval samples (the rest: the packed corpus)
    mix: list[MixSourceConfig] = field(default_factory=list)  # weighted text sources (else the corpus + long docs)
    abf_theta: Optional[float] = None  # rope=abf: this stage's RoPE base (null: rope.theta)
    init_from: Optional[str] = None  # weights to start from (default: the gated checkpoint of the stage before)
    load_optimizer: bool = False  # also carry the optimizer state over from init_from


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    z_loss: float = 1e-4
    loss_chunk_size: int = 256  # tokens per chunk of the fused output projection + cross-entropy
    # A step whose loss or grad norm is not finite is skipped (not applied); this many in a
    # row stop the stage, naming the last good checkpoint.
    max_nonfinite_steps: int = 5


@dataclass
class ParallelConfig:
    dp: int = 1
    cp: int = 1
    # How attention crosses the cp ranks: the zigzag ring, Ulysses all-to-all over the
    # heads, or both (cp = ulysses × ring degree: Ulysses inside a node, the ring across).
    cp_method: str = "ring"
    ulysses: int = 1  # the Ulysses degree for hybrid; ulysses uses all of cp

    def ulysses_degree(self) -> int:
        """Ranks one Ulysses all-to-all spans (1: none)."""
        return {"ring": 1, "ulysses": self.cp, "hybrid": self.ulysses}.get(self.cp_method, 1)
    timeout_s: int = 600  # a collective that waits longer (a hung or dead rank) ends the job
    prepare_timeout_s: int = 7200  # how long the other ranks wait while rank 0 prepares data


@dataclass
class LoggingConfig:
    log_every: int = 10
    wandb: bool = False
    wandb_project: str = "longtrain"
    progress: bool = True
    peak_tflops: Optional[float] = None  # device peak for MFU; default: known CUDA GPUs only
    report: bool = True  # report.html + report.md in run.dir when the run ends (longtrain/reporting/run_report.py)


@dataclass
class EvalConfig:
    val_every: int = 100
    val_batches: int = 4
    position_buckets: int = 16  # loss-by-position buckets written at each gate (0 = off)
    position_windows: int = 8  # validation windows of the stage length it averages over


@dataclass
class GateConfig:
    """When a stage may hand over to the next (as Llama 3 gated its extension stages)."""

    min_recall: float = 0.9  # needle recall over the depth grid at the stage length
    max_short_loss_increase: float = 0.05  # short-context val loss ≤ (1 + this) × the stage before's
    max_extra_steps: int = 0  # on failure, train on up to this many steps, re-evaluating
    extra_steps_increment: int = 50
    extra_lr_ratio: float = 0.5  # peak LR of an extra increment, as a fraction of optim.lr
    force: bool = False  # enter a stage although the stage before did not pass (recorded)
    depths: list[float] = field(default_factory=lambda: [i / 10 for i in range(11)])
    trials: int = 10  # samples per (length, depth) cell
    kind: str = "passkey"  # the single needle: gate.json's top-level recall, ≥ min_recall
    min_cell_recall: float = 0.0  # and none of its depth cells below this
    # More retrieval kinds evaluated at every gate, before and after training: gated ones,
    # each → its min recall (add one with +gate.tasks.vartrack=0.5), and ones only reported
    # (a reported task that is also gated is gated).
    tasks: dict[str, float] = field(default_factory=dict)
    report_tasks: list[str] = field(default_factory=list)
    report_trials: int = 0  # samples per depth for report_tasks (0: gate.trials); they decide nothing
    # The short-context loss check: a fixed set of samples, the same in every stage, so that a
    # stage compares its loss with the stage before's on the very same tokens.
    short_val_samples: int = 64


@dataclass
class ExportConfig:
    after_gate: bool = False  # write a Hugging Face folder (STAGE/hf) for every stage that passes its gate
    max_shard_size: str = "5GB"  # safetensors files are split past this size


@dataclass
class CurriculumConfig:
    name: str = "gpu"
    stages: list[str] = field(default_factory=lambda: ["pretrain", "extend_32k", "extend_128k"])


@dataclass
class RunConfig:
    dir: str = "runs/default"
    id: Optional[str] = None  # the run's identity (wandb id, checkpoint owner); null: read from or written to run.dir/run.json
    seed: int = 0
    resume: str = "none"  # none | auto | PATH to a checkpoint folder
    overwrite: bool = False  # start fresh in stage folders that hold an earlier run's state, deleting it
    dry_run: bool = False  # validate every stage and print the plan; nothing is written or computed
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    threads: int = 0  # torch intra-op threads; 0 = torch default


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    rope: RopeConfig = field(default_factory=RopeConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    retrieval: "RetrievalConfig" = field(default_factory=lambda: RetrievalConfig())
    gate: GateConfig = field(default_factory=GateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    run: RunConfig = field(default_factory=RunConfig)


def merge_config(raw: DictConfig | dict[str, Any]) -> Config:
    """A composed Hydra config merged into the schema: unknown keys and wrong types are
    ConfigErrors; values are checked by :func:`validate`."""
    schema = OmegaConf.structured(Config)
    raw = OmegaConf.create(raw) if isinstance(raw, dict) else raw
    unknown = [k for k in raw.keys() if k not in Config.__dataclass_fields__ and k != "hydra"]
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key; valid top-level keys: {', '.join(Config.__dataclass_fields__)}")
    raw = OmegaConf.masked_copy(raw, [k for k in raw.keys() if k != "hydra"])
    try:
        merged = OmegaConf.merge(schema, raw)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{key}: {msg}") from None


def resolve_stage(cfg: Config) -> None:
    """Set the stage's RoPE and micro-batch (:func:`stage_rope`, :func:`stage_micro_batch`).
    The keys they divide by or substitute are checked first, so their errors name them."""
    _positive(cfg.rope.original_max_position_embeddings, "rope.original_max_position_embeddings")
    _positive(cfg.stage.seq_len, "stage.seq_len")
    if cfg.stage.abf_theta is not None:
        require(cfg.stage.abf_theta > 1, "stage.abf_theta", f"must be > 1 (the stage's RoPE base), got {cfg.stage.abf_theta}")
    cfg.rope = stage_rope(cfg)
    cfg.stage = stage_micro_batch(cfg)


def gate_tasks(cfg: Config) -> dict[str, Optional[float]]:
    """Every task a gate evaluates → its min recall (None: reported only); the single needle
    first. A task both gated and listed as reported is gated."""
    gated = {cfg.gate.kind: cfg.gate.min_recall, **cfg.gate.tasks}
    return {**gated, **{t: None for t in cfg.gate.report_tasks if t not in gated}}


def stage_micro_batch(cfg: Config) -> StageConfig:
    """``stage.micro_batch_size`` caps the sequences per forward on one rank; with more
    data-parallel ranks than that leaves work for, each rank takes its share of the global
    batch, so a recipe's global batch (and loss curve) stays the same at any dp."""
    s, dp = cfg.stage, cfg.parallel.dp
    if dp > 0 and s.global_batch_size % dp == 0 and s.micro_batch_size * dp > s.global_batch_size:
        return replace(s, micro_batch_size=max(1, s.global_batch_size // dp))
    return s


def stage_rope(cfg: Config) -> RopeConfig:
    """The RoPE of this stage, derived from the rope group and the stage.

    ``rope.original_max_position_embeddings`` is the pretraining length. Scaled types
    (yarn, linear, dynamic, llama3) with ``rope.factor: null`` take the stage's length
    over it (1 for the pretraining stage and anything shorter, where they equal plain
    RoPE); abf takes the stage's ``abf_theta`` as the new base.
    """
    r = cfg.rope
    theta = cfg.stage.abf_theta if r.type == "abf" and cfg.stage.abf_theta is not None else r.theta
    factor = r.factor if r.factor is not None else max(1.0, cfg.stage.seq_len / r.original_max_position_embeddings)
    return replace(r, theta=theta, factor=factor)


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _one_of(value: str, key: str, valid: tuple[str, ...]) -> None:
    require(value in valid, key, f"unknown value {value!r}; valid: {', '.join(valid)}")


def _positive(value: float, key: str) -> None:
    require(value > 0, key, f"must be > 0, got {value}")


def validate(cfg: Config) -> None:
    """Every value a type cannot express, section by section; the first bad one is a
    ConfigError. What depends on the world outside the config (the ranks, files, folders,
    the device) is checked above: ParallelDims, longtrain/run_config.py, longtrain/preflight.py."""
    check_model(cfg.model)
    check_rope(cfg.rope, cfg.parallel)
    check_tokenizer(cfg.tokenizer)
    check_data(cfg.data)
    check_stage(cfg.stage)
    check_optim(cfg.optim)
    check_parallel(cfg.parallel)
    check_cp_method(cfg.parallel, cfg.model)
    check_gate(cfg.gate)
    check_retrieval(cfg.retrieval)
    require(bool(cfg.curriculum.stages), "curriculum.stages", "needs at least one stage")
    check_shard_size(cfg.export.max_shard_size, "export.max_shard_size")
    check_logging(cfg.logging)
    check_eval(cfg.eval)
    check_run(cfg.run)


def check_model(m: ModelConfig) -> None:
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads"):
        _positive(getattr(m, key), f"model.{key}")
    require(
        m.n_heads % m.n_kv_heads == 0,
        "model.n_heads",
        f"{m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}; "
        "n_heads must be a multiple of n_kv_heads",
    )
    if m.head_dim is None:
        require(
            m.dim % m.n_heads == 0,
            "model.dim",
            f"{m.dim} is not divisible by model.n_heads={m.n_heads}; set model.head_dim explicitly",
        )
    head_dim = m.resolved_head_dim()
    require(head_dim > 0 and head_dim % 2 == 0, "model.head_dim", f"must be even and > 0 for RoPE, got {head_dim}")
    require(m.resolved_ffn_dim() > 0, "model.ffn_dim", f"must be > 0, got {m.ffn_dim}")
    require(m.nope_every >= 0, "model.nope_every", f"must be >= 0 (0 = RoPE on every layer), got {m.nope_every}")
    _positive(m.norm_eps, "model.norm_eps")
    _positive(m.init_std, "model.init_std")
    if m.vocab_size is not None:
        _positive(m.vocab_size, "model.vocab_size")
    _one_of(m.activation_checkpointing, "model.activation_checkpointing", AC_MODES)
    require(m.mlp_tile_tokens >= 0, "model.mlp_tile_tokens", f"must be >= 0 (0 = no tiling), got {m.mlp_tile_tokens}")


def check_rope(r: RopeConfig, parallel: ParallelConfig) -> None:
    _one_of(r.type, "rope.type", ROPE_TYPES)
    require(r.theta > 1, "rope.theta", f"must be > 1, got {r.theta}")
    require(
        r.factor >= 1,
        "rope.factor",
        f"must be >= 1, got {r.factor} (null means stage.seq_len / rope.original_max_position_embeddings)",
    )
    _positive(r.original_max_position_embeddings, "rope.original_max_position_embeddings")
    if r.type == "yarn":
        require(r.beta_fast > r.beta_slow > 0, "rope.beta_fast", "yarn needs beta_fast > beta_slow > 0")
    if r.type == "llama3":
        require(
            r.high_freq_factor > r.low_freq_factor > 0,
            "rope.high_freq_factor",
            "llama3 needs high_freq_factor > low_freq_factor > 0",
        )
    require(
        not (r.type == "dynamic" and parallel.cp > 1),
        "rope.type",
        "dynamic NTK depends on each rank's maximum position, which differs across zigzag shards; "
        "with parallel.cp > 1 use default, abf, linear, yarn or llama3",
    )
    if r.attention_factor is not None:
        _positive(r.attention_factor, "rope.attention_factor")


def check_tokenizer(t: TokenizerConfig) -> None:
    _one_of(t.type, "tokenizer.type", TOKENIZERS)
    if t.type == "hf":
        require(t.path is not None, "tokenizer.path", "tokenizer.type=hf needs a local tokenizer folder")


def check_data(d: DataConfig) -> None:
    _one_of(d.source, "data.source", SOURCES)
    if d.source in ("local", "hf"):
        require(bool(d.path), "data.path", f"data.source={d.source} needs data.path")
    require(0 < d.val_percent < 100, "data.val_percent", f"must be in (0, 100), got {d.val_percent}")
    if d.max_docs is not None:
        _positive(d.max_docs, "data.max_docs")


def check_stage(s: StageConfig) -> None:
    _positive(s.seq_len, "stage.seq_len")
    _positive(s.steps, "stage.steps")
    _positive(s.global_batch_size, "stage.global_batch_size")
    _positive(s.micro_batch_size, "stage.micro_batch_size")
    require(s.warmup_steps >= 0, "stage.warmup_steps", f"must be >= 0, got {s.warmup_steps}")
    require(0 <= s.decay_fraction <= 1, "stage.decay_fraction", f"must be in [0, 1], got {s.decay_fraction}")
    _one_of(s.decay_shape, "stage.decay_shape", DECAY_SHAPES)
    for key in ("long_doc_share", "retrieval_share"):
        require(0 <= getattr(s, key) <= 1, f"stage.{key}", f"must be in [0, 1], got {getattr(s, key)}")
    require(
        s.long_doc_share + s.retrieval_share <= 1,
        "stage.retrieval_share",
        f"stage.long_doc_share + stage.retrieval_share = {s.long_doc_share + s.retrieval_share} must be <= 1",
    )
    require(0 <= s.final_lr_ratio <= 1, "stage.final_lr_ratio", f"must be in [0, 1], got {s.final_lr_ratio}")
    check_mix(s)


def check_mix(s: StageConfig) -> None:
    if not s.mix:
        return
    require(not s.long_doc_share, "stage.long_doc_share", "must be 0 when stage.mix lists the sources (give a long source a min_doc_tokens instead)")
    require(sum(e.weight for e in s.mix) > 0, "stage.mix", "weights must have a positive sum")
    for i, e in enumerate(s.mix):
        key = f"stage.mix[{i}]"
        require(e.weight >= 0, f"{key}.weight", f"must be >= 0, got {e.weight}")
        require(e.min_doc_tokens >= 0, f"{key}.min_doc_tokens", f"must be >= 0, got {e.min_doc_tokens}")
        if e.max_doc_tokens is not None:
            require(e.max_doc_tokens >= e.min_doc_tokens, f"{key}.max_doc_tokens", f"must be >= min_doc_tokens={e.min_doc_tokens}")


def check_optim(o: OptimConfig) -> None:
    _positive(o.lr, "optim.lr")
    require(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    require(0 <= o.beta1 < 1, "optim.beta1", f"must be in [0, 1), got {o.beta1}")
    require(0 <= o.beta2 < 1, "optim.beta2", f"must be in [0, 1), got {o.beta2}")
    _positive(o.eps, "optim.eps")
    require(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 = off), got {o.grad_clip}")
    require(o.z_loss >= 0, "optim.z_loss", f"must be >= 0, got {o.z_loss}")
    _positive(o.loss_chunk_size, "optim.loss_chunk_size")
    _positive(o.max_nonfinite_steps, "optim.max_nonfinite_steps")


def check_parallel(p: ParallelConfig) -> None:
    """The sizes only; how they split a stage over the ranks is ParallelDims' check."""
    _positive(p.dp, "parallel.dp")
    _positive(p.cp, "parallel.cp")
    _positive(p.timeout_s, "parallel.timeout_s")
    _positive(p.prepare_timeout_s, "parallel.prepare_timeout_s")


def check_cp_method(p: ParallelConfig, m: ModelConfig) -> None:
    """Ulysses splits the heads over its ranks: each needs whole query heads and whole
    (possibly repeated) K/V heads."""
    _one_of(p.cp_method, "parallel.cp_method", CP_METHODS)
    _positive(p.ulysses, "parallel.ulysses")
    if p.cp_method == "ulysses":
        require(p.ulysses in (1, p.cp), "parallel.ulysses", f"ulysses uses all of parallel.cp={p.cp}; got {p.ulysses} (use cp_method=hybrid)")
    if p.cp_method == "hybrid":
        require(p.ulysses >= 2, "parallel.ulysses", f"hybrid needs a Ulysses degree >= 2, got {p.ulysses}")
        require(p.cp % p.ulysses == 0, "parallel.ulysses", f"{p.ulysses} does not divide parallel.cp={p.cp} (cp = ulysses × ring)")
    u = p.ulysses_degree()
    if u > 1:
        require(m.n_heads % u == 0, "parallel.ulysses", f"{u} Ulysses ranks do not divide model.n_heads={m.n_heads}")
        # U ≤ n_kv_heads: each rank takes whole K/V groups; beyond, each K/V head is repeated.
        require(m.n_kv_heads % u == 0 if u <= m.n_kv_heads else u % m.n_kv_heads == 0, "parallel.ulysses",
                f"{u} Ulysses ranks cannot share model.n_kv_heads={m.n_kv_heads} K/V heads evenly (use a multiple or a divisor)")


def check_gate(g: GateConfig) -> None:
    require(0 <= g.min_recall <= 1, "gate.min_recall", f"must be in [0, 1], got {g.min_recall}")
    require(g.max_short_loss_increase >= 0, "gate.max_short_loss_increase", f"must be >= 0, got {g.max_short_loss_increase}")
    require(g.max_extra_steps >= 0, "gate.max_extra_steps", f"must be >= 0, got {g.max_extra_steps}")
    _positive(g.extra_steps_increment, "gate.extra_steps_increment")
    require(0 < g.extra_lr_ratio <= 1, "gate.extra_lr_ratio", f"must be in (0, 1], got {g.extra_lr_ratio}")
    require(bool(g.depths) and all(0 <= d <= 1 for d in g.depths), "gate.depths", f"need fractions in [0, 1], got {g.depths}")
    _positive(g.trials, "gate.trials")
    require(g.report_trials >= 0, "gate.report_trials", f"must be >= 0 (0: gate.trials), got {g.report_trials}")
    _one_of(g.kind, "gate.kind", RETRIEVAL_KINDS)
    require(0 <= g.min_cell_recall <= 1, "gate.min_cell_recall", f"must be in [0, 1], got {g.min_cell_recall}")
    for task, threshold in g.tasks.items():
        _one_of(task, f"gate.tasks.{task}", RETRIEVAL_KINDS)
        require(task != g.kind, f"gate.tasks.{task}", "is the gate's single needle (gate.kind); its threshold is gate.min_recall")
        require(0 <= threshold <= 1, f"gate.tasks.{task}", f"must be a recall in [0, 1], got {threshold}")
    for task in g.report_tasks:
        _one_of(task, "gate.report_tasks", RETRIEVAL_KINDS)
        require(g.report_tasks.count(task) == 1, "gate.report_tasks", f"lists {task} twice")
    _positive(g.short_val_samples, "gate.short_val_samples")


def check_retrieval(rc: RetrievalConfig) -> None:
    check_retrieval_kinds(rc.kinds)
    for key in ("key_digits", "kv_pairs", "kv_key_chars", "multi_values", "vartrack_chains", "vartrack_hops", "cwe_words"):
        _positive(getattr(rc, key), f"retrieval.{key}")
    require(1 <= rc.multi_queries <= rc.kv_pairs, "retrieval.multi_queries", f"must be in [1, retrieval.kv_pairs={rc.kv_pairs}], got {rc.multi_queries}")


def check_logging(lg: LoggingConfig) -> None:
    _positive(lg.log_every, "logging.log_every")
    if lg.peak_tflops is not None:
        _positive(lg.peak_tflops, "logging.peak_tflops")


def check_eval(e: EvalConfig) -> None:
    require(e.val_every >= 0, "eval.val_every", f"must be >= 0 (0 = off), got {e.val_every}")
    _positive(e.val_batches, "eval.val_batches")
    require(e.position_buckets >= 0, "eval.position_buckets", f"must be >= 0 (0 = off), got {e.position_buckets}")
    _positive(e.position_windows, "eval.position_windows")


def check_run(run: RunConfig) -> None:
    _positive(run.checkpoint_every, "run.checkpoint_every")
    _positive(run.keep_checkpoints, "run.keep_checkpoints")
    _one_of(run.device, "run.device", ("auto", "cpu", "cuda"))
    _one_of(run.dtype, "run.dtype", DTYPES)
    require(run.threads >= 0, "run.threads", f"must be >= 0, got {run.threads}")
    require(
        not (run.overwrite and run.resume != "none"),
        "run.overwrite",
        f"deletes the stages' earlier state; it cannot be combined with run.resume={run.resume}",
    )


def check_shard_size(value: str, key: str) -> None:
    """A size huggingface_hub's shard splitter reads (config validation and the export CLI)."""
    require(
        re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]B", value, re.IGNORECASE) is not None,
        key,
        f"{value!r} is not a size; valid: a number with KB, MB, GB or TB, e.g. 5GB, 500MB",
    )


RETRIEVAL_KINDS = (  # longtrain/data/retrieval.py
    "passkey", "kv", "copy", "induction", "multikey", "multiquery", "multivalue", "vartrack", "cwe",
)


def check_retrieval_kinds(kinds: list[str]) -> None:
    """Config validation and RetrievalDataset (library callers) share this one check."""
    require(
        bool(kinds) and all(k in RETRIEVAL_KINDS for k in kinds),
        "retrieval.kinds",
        f"{list(kinds)} is not a non-empty list of {', '.join(RETRIEVAL_KINDS)}",
    )


@dataclass
class RetrievalConfig:
    """Synthetic retrieval samples (``longtrain/data/retrieval.py``)."""

    kinds: list[str] = field(default_factory=lambda: ["passkey", "kv"])
    key_digits: int = 5  # pass keys and kv values
    kv_pairs: int = 4  # key–value needles per kv sample
    kv_queries: int = 1  # how many of them are asked at the end
    kv_key_chars: int = 6  # kv and copy keys (induction: tag tokens)
    copy_segments: int = 2  # tagged segments per copy (and induction) sample
    copy_segment_len: int = 48
    copy_queries: int = 2
    multi_queries: int = 2  # multiquery: keys (of kv_pairs) asked in one question
    multi_values: int = 4  # multivalue: values stated for the one key
    vartrack_chains: int = 1  # vartrack: chains of assignments (one asked, the others distractors)
    vartrack_hops: int = 4  # vartrack: assignments after each chain's first
    cwe_words: int = 3  # cwe: the most common words asked for
    loss: str = "answer"  # answer: loss on answer tokens only | all: on every token
