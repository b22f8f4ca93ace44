"""Communication model of context parallelism, for the planner (longtrain/plan.py).

What one rank sends for attention, per layer and micro-batch, under each ``parallel.cp_method``
(B micro-batch, T seq_len, D head_dim, Hq query heads, Hkv K/V heads, e bytes of the compute
dtype; activation checkpointing never reruns attention, so it adds no traffic):

- ring, degree R, local length L = T/R: the forward sends K and V stacked on each of R−1
  hops, 2·B·Hkv·L·D·e each; the backward R−1 such hops plus R hops of dK/dV in fp32,
  2·B·Hkv·L·D·4 each.
- Ulysses, degree U: K/V heads are repeated to Hkv' = max(Hkv, U); the forward's two
  all-to-alls (q, k, v in; out back) and the backward's two (dout in; dq, dk, dv back) each
  move (U−1)/U of B·(T/U)·D·e·(2·Hq + 2·Hkv') bytes per direction.
- hybrid, U × R: the Ulysses part on this rank's T/(U·R) tokens, then the ring over R
  with local length T/R and heads Hq/U, Hkv'/U.

Time: bytes over the link a group crosses plus one latency per hop or all-to-all, against
the attention's causal FLOPs (4·B·T²·Hq·D/2 per layer forward, 2.5× that backward, split
over cp) at an achieved rate. The ring overlaps its hops with the blocks it computes, so
only its excess over the compute shows; an all-to-all does not overlap and adds in full.
docs/parallel.md#choosing-a-method writes the model down with the defaults' sources.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from longtrain.config import Config, ConfigError

GB = 10**9
# model.activation_checkpointing, cheapest in compute first (the order --suggest tries).
MODES = ("none", "selective", "full")
# Per GPU and direction. NVLink 4 (H100/H200 SXM) is 900 GB/s both ways together; one
# 400 Gb/s InfiniBand NIC per GPU (a DGX/HGX node's 8 × ConnectX-7) is 50 GB/s.
INTRA_GBPS = 450.0
INTER_GBPS = 50.0
# A small message's latency through NCCL, as an order of magnitude (nothing here measures
# it: no multi-GPU machine has been lent to this project).
INTRA_LATENCY_US = 10.0
INTER_LATENCY_US = 20.0
# What a bf16 flash-attention kernel achieves at long lengths on H100/H200 (~40% of the
# 989 TFLOP/s dense peak); assumed, not measured.
ATTENTION_TFLOPS = 400.0
BACKWARD_FLOPS = 2.5  # flash attention's backward runs 2.5× its forward's FLOPs
GRAD_BYTES = 4  # the ring's dK/dV travel in fp32, whatever the compute dtype
A2A_CALLS = 2  # all-to-alls per direction: q, k, v then out (dout then dq, dk, dv)
TIE = 0.02  # predicted times within 2% count as equal


def parse_rate(text: str, flag: str) -> float:
    """Bytes per second from '450' (GB/s), '450GB/s' or '400Gb/s' (bits)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(GB/s|Gb/s)?\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"{flag}: {text!r} is not a bandwidth; valid: e.g. 450 (GB/s), 450GB/s, 400Gb/s")
    return float(m.group(1)) * GB / (8 if m.group(2) == "Gb/s" else 1)


def positive(value: float, flag: str) -> None:
    if value <= 0:
        raise ConfigError(f"{flag}: must be > 0, got {value:g}")


@dataclass(frozen=True)
class Cluster:
    """GPUs per node and the two links each GPU has: inside the node and to other nodes."""

    gpus_per_node: int = 8
    intra_bytes_s: float = INTRA_GBPS * GB
    inter_bytes_s: float = INTER_GBPS * GB
    intra_latency_s: float = INTRA_LATENCY_US * 1e-6
    inter_latency_s: float = INTER_LATENCY_US * 1e-6
    attention_flops: float = ATTENTION_TFLOPS * 1e12

    def spans_nodes(self, ranks: int) -> bool:
        """Whether a group of ``ranks`` neighbouring ranks crosses a node boundary: groups
        start at multiples of their size (rank = dp_rank·cp + cp_rank, Ulysses innermost),
        so one that does not tile a node straddles two somewhere, and the slowest group
        sets the pace."""
        return ranks > 1 and (ranks > self.gpus_per_node or self.gpus_per_node % ranks != 0)

    def link(self, ranks: int) -> tuple[float, float, str]:
        """Bandwidth, latency and name of the link a group of ``ranks`` waits on."""
        if self.spans_nodes(ranks):
            return self.inter_bytes_s, self.inter_latency_s, "IB"
        return self.intra_bytes_s, self.intra_latency_s, "NVLink"

    def describe(self) -> str:
        return (f"{self.gpus_per_node} GPUs per node; NVLink {self.intra_bytes_s / GB:g} GB/s, "
                f"{self.intra_latency_s * 1e6:g} µs; IB {self.inter_bytes_s / GB:g} GB/s, "
                f"{self.inter_latency_s * 1e6:g} µs per GPU; attention at {self.attention_flops / 1e12:g} TFLOP/s")


@dataclass(frozen=True)
class AttentionShape:
    batch: int  # sequences per micro-batch
    seq_len: int
    head_dim: int
    n_heads: int
    n_kv_heads: int
    n_layers: int
    elem: int  # bytes of the compute dtype


def attention_shape(cfg: Config, elem: int) -> AttentionShape:
    m = cfg.model
    return AttentionShape(cfg.stage.micro_batch_size, cfg.stage.seq_len, m.resolved_head_dim(), m.n_heads,
                          m.n_kv_heads, m.n_layers, elem)


def kv_heads(n_kv_heads: int, ulysses: int) -> int:
    """K/V heads after Ulysses repeats them so that each of its ranks has one (Hkv')."""
    return max(n_kv_heads, ulysses)


@dataclass(frozen=True)
class LayerTraffic:
    """One layer, one micro-batch, one rank: bytes sent and latency-bound steps."""

    ring_forward: int = 0
    ring_backward: int = 0
    ring_forward_hops: int = 0
    ring_backward_hops: int = 0
    a2a_forward: int = 0  # each direction of the all-to-all moves as much
    a2a_backward: int = 0
    a2a_calls: int = 0  # per pass (forward, backward)


def layer_traffic(s: AttentionShape, ulysses: int, ring: int) -> LayerTraffic:
    hkv = kv_heads(s.n_kv_heads, ulysses)
    ring_part: dict[str, int] = {}
    if ring > 1:
        block = 2 * s.batch * (hkv // ulysses) * (s.seq_len // ring) * s.head_dim  # K and V of one ring rank
        ring_part = dict(ring_forward=(ring - 1) * block * s.elem,
                         ring_backward=(ring - 1) * block * s.elem + ring * block * GRAD_BYTES,
                         ring_forward_hops=ring - 1, ring_backward_hops=2 * ring - 1)
    a2a_part: dict[str, int] = {}
    if ulysses > 1:
        tokens = s.seq_len // (ulysses * ring)
        volume = (ulysses - 1) * s.batch * tokens * s.head_dim * s.elem * (2 * s.n_heads + 2 * hkv) // ulysses
        a2a_part = dict(a2a_forward=volume, a2a_backward=volume, a2a_calls=A2A_CALLS)
    return LayerTraffic(**ring_part, **a2a_part)


def attention_flops(s: AttentionShape) -> float:
    """Causal attention FLOPs of one layer's forward on one micro-batch (half of 4·B·T²·Hq·D)."""
    return 4 * s.batch * s.seq_len**2 * s.n_heads * s.head_dim / 2


@dataclass(frozen=True)
class MethodCost:
    """One cp method on one rank, per optimizer step (every layer, every micro-batch)."""

    method: str
    ulysses: int
    ring: int
    bytes: int  # sent
    hops: int  # ring hops + all-to-alls: each pays a latency
    ring_s: float  # the ring's traffic, forward + backward
    a2a_s: float  # the all-to-alls', forward + backward
    compute_s: float  # attention compute on this rank, forward + backward
    exposed_s: float  # communication the step waits for
    ring_exposed_s: float  # the ring's part of it: its excess over the compute, by pass
    ring_link: str
    a2a_link: str

    @property
    def cp(self) -> int:
        return self.ulysses * self.ring

    @property
    def ring_hidden(self) -> bool:
        return self.ring_exposed_s == 0

    @property
    def attention_s(self) -> float:
        return self.compute_s + self.exposed_s

    @property
    def label(self) -> str:
        return "local" if self.cp == 1 else self.method


def a2a_seconds(nbytes: int, ulysses: int, c: Cluster) -> float:
    """An all-to-all sends 1/U of its bytes to each of U−1 peers; across nodes the peers on
    other nodes go over IB while those on the node use NVLink at the same time."""
    if not c.spans_nodes(ulysses):
        return nbytes / c.intra_bytes_s
    on_node = c.gpus_per_node if ulysses % c.gpus_per_node == 0 else 1  # a straddling group: worst rank
    per_peer = nbytes / (ulysses - 1)
    return max((on_node - 1) * per_peer / c.intra_bytes_s, (ulysses - on_node) * per_peer / c.inter_bytes_s)


def method_cost(s: AttentionShape, method: str, ulysses: int, ring: int, micro_batches: int, c: Cluster) -> MethodCost:
    """The cost of ``method`` (ulysses × ring = cp) for ``micro_batches`` per rank and step."""
    t = layer_traffic(s, ulysses, ring)
    per_step = s.n_layers * micro_batches
    forward = attention_flops(s) / (ulysses * ring) / c.attention_flops
    backward = BACKWARD_FLOPS * forward
    ring_bw, ring_latency, ring_link = c.link(ulysses * ring)
    ring_fwd = t.ring_forward / ring_bw + t.ring_forward_hops * ring_latency
    ring_bwd = t.ring_backward / ring_bw + t.ring_backward_hops * ring_latency
    a2a_latency = c.link(ulysses)[1]
    a2a = 0.0
    if ulysses > 1:
        a2a = sum(a2a_seconds(n, ulysses, c) + t.a2a_calls * a2a_latency for n in (t.a2a_forward, t.a2a_backward))
    # The ring hides behind the blocks it computes; the all-to-alls sit between ops.
    ring_exposed = max(0.0, ring_fwd - forward) + max(0.0, ring_bwd - backward)
    return MethodCost(
        method, ulysses, ring,
        bytes=per_step * (t.ring_forward + t.ring_backward + t.a2a_forward + t.a2a_backward),
        hops=per_step * (t.ring_forward_hops + t.ring_backward_hops + 2 * t.a2a_calls),
        ring_s=per_step * (ring_fwd + ring_bwd), a2a_s=per_step * a2a, compute_s=per_step * (forward + backward),
        exposed_s=per_step * (ring_exposed + a2a), ring_exposed_s=per_step * ring_exposed,
        ring_link=ring_link if ring > 1 else "-", a2a_link=c.link(ulysses)[2] if ulysses > 1 else "-")


def splits(cp: int, n_heads: int) -> list[tuple[str, int]]:
    """(method, Ulysses degree) of every way to run ``cp`` ranks: the ring, Ulysses over all
    of them, and each hybrid U × R with both ≥ 2. Ulysses splits the heads, so U ≤ n_heads;
    whether the model's head counts allow a U is the config's check."""
    if cp == 1:
        return [("ring", 1)]
    ulysses = [("ulysses", cp)] if cp <= n_heads else []
    return [("ring", 1), *ulysses, *[("hybrid", u) for u in range(2, min(cp, n_heads + 1)) if cp % u == 0]]


@dataclass(frozen=True)
class Candidate:
    """One row of --suggest: a layout, its method's cost and the memory of its cheapest
    checkpointing that fits (else of the last tried)."""

    dp: int
    cost: MethodCost
    checkpointing: str
    peak: int
    fits: bool

    def overrides(self) -> str:
        c = self.cost
        words = [f"parallel.cp={c.cp}", f"parallel.dp={self.dp}"]
        if c.cp > 1:
            words.append(f"parallel.cp_method={c.method}")
        if c.method == "hybrid":
            words.append(f"parallel.ulysses={c.ulysses}")
        return " ".join([*words, f"model.activation_checkpointing={self.checkpointing}"])


def _tie_key(c: Candidate) -> tuple[int, int, float, int]:
    # Equal times: the smallest cp (docs/parallel.md: the fewest ranks a sequence waits on),
    # then the least recompute, the least exposed communication, the least memory.
    return c.cost.cp, MODES.index(c.checkpointing), c.cost.exposed_s, c.peak


def pick(candidates: list[Candidate]) -> Candidate:
    """The fastest predicted attention (compute + exposed communication) among those that
    fit; among equals (within TIE) the first by _tie_key. If none fits, the smallest peak."""
    fit = [c for c in candidates if c.fits]
    if not fit:
        return min(candidates, key=lambda c: c.peak)
    fastest = min(c.cost.attention_s for c in fit)
    return min((c for c in fit if c.cost.attention_s <= fastest * (1 + TIE)), key=_tie_key)


def seconds(x: float) -> str:
    if x >= 1:
        return f"{x:.2f} s"
    return f"{x * 1e3:.1f} ms" if x >= 1e-3 else f"{x * 1e6:.0f} µs"


def gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB"


def _name(c: Candidate) -> str:
    return f"{c.cost.label} {c.cost.ulysses}×{c.cost.ring}"


def costs_text(k: MethodCost) -> list[str]:
    """What a method's communication does to the step, in a few words each."""
    parts = []
    if k.ring > 1:
        ring = f"its ring's {seconds(k.ring_s)} over {k.ring_link}"
        parts.append(f"{ring} hides under {seconds(k.compute_s)} of compute" if k.ring_hidden else
                     f"{ring} is not hidden by {seconds(k.compute_s)} of compute: {seconds(k.ring_exposed_s)} exposed")
    if k.ulysses > 1:
        parts.append(f"its all-to-alls over {k.a2a_link} add {seconds(k.a2a_s)}")
    return parts or ["no communication"]


def reasons(best: Candidate, candidates: list[Candidate]) -> list[str]:
    """Two lines: why ``best``, and why not the runner-up."""
    checkpointing = "no" if best.checkpointing == "none" else best.checkpointing
    lines = [f"why: {_name(best)}: " + "; ".join(costs_text(best.cost)) + f"; peak {gib(best.peak)} with {checkpointing} checkpointing"]
    rest = [c for c in candidates if c is not best and c.fits]
    if rest:
        nxt = min(rest, key=lambda c: (c.cost.attention_s, _tie_key(c)))
        slower = nxt.cost.attention_s > best.cost.attention_s * (1 + TIE)
        if slower:
            gap = f"{nxt.cost.attention_s / best.cost.attention_s - 1:+.0%} attention time: " + "; ".join(costs_text(nxt.cost))
        else:
            worse = [why for a, b, why in zip(_tie_key(nxt), _tie_key(best), (
                f"a larger cp ({nxt.cost.cp})", f"{nxt.checkpointing} checkpointing",
                f"more exposed communication ({seconds(nxt.cost.exposed_s)})", f"more memory ({gib(nxt.peak)})")) if a != b]
            gap = f"within {TIE:.0%} of its time, but {worse[0]}" if worse else "a tie"
        lines.append(f"next: {_name(nxt)} at cp={nxt.cost.cp}: {gap}")
    return lines


def format_table(candidates: list[Candidate]) -> list[str]:
    head = (f"{'cp':>5} {'dp':>4}  {'method':<8}{'U×R':>6}  {'checkpointing':<14}{'peak/rank':>10} {'fits':>5}"
            f"{'GB sent':>9}{'hops':>9}  {'ring':<18}{'all-to-all':<18}{'compute':>10}{'exposed':>10}")
    lines = [head]
    for c in candidates:
        k = c.cost
        ring = f"{seconds(k.ring_s)} {k.ring_link}" if k.ring > 1 else "-"
        a2a = f"{seconds(k.a2a_s)} {k.a2a_link}" if k.ulysses > 1 else "-"
        lines.append(f"{k.cp:>5} {c.dp:>4}  {k.label:<8}{f'{k.ulysses}×{k.ring}':>6}  {c.checkpointing:<14}"
                     f"{gib(c.peak):>10} {'yes' if c.fits else 'no':>5}{k.bytes / GB:>9.2f}{k.hops:>9,}  "
                     f"{ring:<18}{a2a:<18}{seconds(k.compute_s):>10}{seconds(k.exposed_s):>10}")
    return lines
