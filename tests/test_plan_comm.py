"""The planner's context-parallel side (longtrain/plan_comm.py, plan.py --suggest): the
communication formulas against hand-computed numbers, the memory each method adds, the
config's checks on parallel.cp_method / parallel.ulysses, --suggest on three cluster shapes
(what docs/parallel.md shows) and its flags' one-line errors."""

from __future__ import annotations

import re
from typing import Optional
from dataclasses import replace

import pytest

from longtrain import plan
from longtrain.config import Config, ModelConfig, ParallelConfig, validate
from longtrain.plan_comm import (
    AttentionShape, Candidate, Cluster, MethodCost, a2a_seconds, layer_traffic, method_cost, parse_rate, pick, splits,
)
from longtrain.run_config import load_config
from tests.cli_utils import ROOT, run_main
from tests.test_docs import all_examples

# B=1, T=64, D=8, Hq=4, Hkv=2, bf16, one layer: numbers small enough to do by hand.
SHAPE = AttentionShape(batch=1, seq_len=64, head_dim=8, n_heads=4, n_kv_heads=2, n_layers=1, elem=2)


def test_ring_traffic_by_hand():
    t = layer_traffic(SHAPE, ulysses=1, ring=4)
    # One hop: K and V of 64/4 = 16 tokens, 2 heads of 8: 2·1·2·16·8 = 512 elements.
    assert t.ring_forward == 3 * 512 * 2  # R−1 hops in bf16
    assert t.ring_backward == 3 * 512 * 2 + 4 * 512 * 4  # R−1 K/V hops + R dK/dV hops in fp32
    assert (t.ring_forward_hops, t.ring_backward_hops) == (3, 7)
    assert (t.a2a_forward, t.a2a_calls) == (0, 0)


def test_ulysses_traffic_by_hand_with_and_without_kv_repeats():
    # U=2 ≤ Hkv: (U−1)/U × B·(T/U)·D·e × (2Hq + 2Hkv) = 1/2 × 32·8·2 × (8 + 4)
    assert layer_traffic(SHAPE, ulysses=2, ring=1).a2a_forward == 512 * 12 // 2 == 3072
    # U=4 > Hkv=2: K/V repeated to 4 heads: 3/4 × 16·8·2 × (8 + 8)
    t = layer_traffic(SHAPE, ulysses=4, ring=1)
    assert t.a2a_forward == t.a2a_backward == 3 * 256 * 16 // 4 == 3072
    assert (t.a2a_calls, t.ring_forward) == (2, 0)


def test_hybrid_traffic_by_hand():
    t = layer_traffic(SHAPE, ulysses=2, ring=2)
    # Ulysses over this rank's 64/4 = 16 tokens: 1/2 × 16·8·2 × (8 + 4)
    assert t.a2a_forward == t.a2a_backward == 1536
    # Ring over 2 with local length 32 and Hkv/U = 1 head: 2·1·1·32·8 = 512 elements a hop.
    assert t.ring_forward == 1 * 512 * 2 and t.ring_backward == 1 * 512 * 2 + 2 * 512 * 4
    assert (t.ring_forward_hops, t.ring_backward_hops) == (1, 3)


# One byte per second inside a node would make every number exact but the model reads GB/s:
# 1024 B/s and 10 ms latency, and the attention rate that makes one layer's whole causal
# forward (2·B·T²·Hq·D = 262,144 FLOPs) take exactly one second.
SLOW = Cluster(gpus_per_node=8, intra_bytes_s=1024, inter_bytes_s=256, intra_latency_s=0.01, inter_latency_s=0.02,
               attention_flops=262144)


def test_ring_time_overlaps_the_compute_and_ulysses_adds_its_all_to_alls():
    ring = method_cost(SHAPE, "ring", 1, 4, micro_batches=1, c=SLOW)
    forward, backward = 1 / 4, 2.5 / 4  # the compute, split over cp=4
    ring_fwd, ring_bwd = 3072 / 1024 + 3 * 0.01, 11264 / 1024 + 7 * 0.01
    assert ring.compute_s == pytest.approx(forward + backward)
    assert ring.ring_s == pytest.approx(ring_fwd + ring_bwd)
    assert ring.exposed_s == pytest.approx((ring_fwd - forward) + (ring_bwd - backward))
    assert not ring.ring_hidden and ring.ring_link == "NVLink" and ring.hops == 10
    uly = method_cost(SHAPE, "ulysses", 4, 1, micro_batches=1, c=SLOW)
    assert uly.exposed_s == uly.a2a_s == pytest.approx(2 * (3072 / 1024 + 2 * 0.01))  # nothing overlaps
    assert uly.hops == 4 and uly.bytes == 2 * 3072
    # Per step: every layer, every micro-batch on this rank.
    many = method_cost(replace(SHAPE, n_layers=2), "ring", 1, 4, micro_batches=3, c=SLOW)
    assert many.bytes == 6 * ring.bytes and many.hops == 60 and many.exposed_s == pytest.approx(6 * ring.exposed_s)
    # A fast enough link hides the ring entirely.
    fast = method_cost(SHAPE, "ring", 1, 4, 1, replace(SLOW, intra_bytes_s=1e9, intra_latency_s=1e-6))
    assert fast.ring_hidden and fast.exposed_s == 0


def test_groups_that_leave_a_node_wait_on_the_slower_link():
    c = Cluster(gpus_per_node=8)
    assert [c.spans_nodes(n) for n in (1, 2, 8, 16, 3)] == [False, False, False, True, True]
    assert method_cost(SHAPE, "ring", 1, 16, 1, replace(SLOW, gpus_per_node=8)).ring_link == "IB"
    # U=16 over two 8-GPU nodes: 1/15 of the bytes to each peer, 7 peers on NVLink, 8 on IB at once.
    assert a2a_seconds(1500, 16, SLOW) == pytest.approx(max(7 * 100 / 1024, 8 * 100 / 256))
    assert a2a_seconds(1500, 8, SLOW) == pytest.approx(1500 / 1024)


def test_splits_cap_ulysses_at_the_heads():
    assert splits(1, 12) == [("ring", 1)]
    assert splits(8, 32) == [("ring", 1), ("ulysses", 8), ("hybrid", 2), ("hybrid", 4)]
    assert splits(16, 4) == [("ring", 1), ("hybrid", 2), ("hybrid", 4)]


def _cost(method: str, u: int, r: int, exposed: float) -> MethodCost:
    return MethodCost(method, u, r, bytes=0, hops=0, ring_s=0.0, a2a_s=exposed, compute_s=1.0, exposed_s=exposed,
                      ring_exposed_s=0.0, ring_link="NVLink", a2a_link="NVLink")


def test_pick_fastest_that_fits_then_smallest_cp_then_least_recompute():
    ring8 = Candidate(1, _cost("ring", 1, 8, 0.0), "none", 10, True)
    hybrid8 = Candidate(1, _cost("hybrid", 2, 4, 0.1), "none", 10, True)
    ring2 = Candidate(4, _cost("ring", 1, 2, 0.0), "full", 70, True)
    too_big = Candidate(8, _cost("ring", 1, 1, 0.0), "full", 90, False)
    assert pick([hybrid8, ring8]) is ring8  # 10% slower loses
    assert pick([ring8, ring2, too_big]) is ring2  # equal time: the smallest cp that fits
    assert pick([Candidate(4, _cost("ring", 1, 2, 0.0), "selective", 60, True), ring2]).checkpointing == "selective"
    assert pick([too_big, replace(too_big, peak=80)]).peak == 80  # nothing fits: the smallest


def _cfg(method: str, cp: int, ulysses: Optional[int] = None, n_heads: int = 8, n_kv_heads: int = 2) -> Config:
    return Config(model=ModelConfig(dim=64, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=8, ffn_dim=96),
                  parallel=ParallelConfig(cp=cp, cp_method=method, ulysses=ulysses))


def test_valid_methods_pass():
    for cfg in (_cfg("ring", 4), _cfg("ulysses", 8), _cfg("hybrid", 8, 4), _cfg("ulysses", 2), _cfg("hybrid", 4, 2)):
        validate(cfg)
    assert [c.parallel.ulysses_degree() for c in (_cfg("ring", 4), _cfg("ulysses", 8), _cfg("hybrid", 8, 4))] == [1, 8, 4]


def _rows(cfg: Config, tokens: int, act: int = 2) -> dict[str, int]:
    return {r.name: r.bytes for r in plan.block_saved(cfg, tokens, act)}


def test_ulysses_memory_adds_the_sequence_layout_out_and_repeated_kv():
    t, hd, act = 256, 8, 2
    ring = _rows(_cfg("ring", 4), t)
    # U=2 ≤ Hkv: the same q, k, v and out as the ring, plus out back in the sequence layout.
    two = _rows(_cfg("ulysses", 2), t)
    assert two["attention q, k, v (head layout)"] == ring["attention q, k, v"]
    assert two["attention out (sequence layout)"] == t * 8 * hd * act
    assert sum(two.values()) - sum(ring.values()) == t * 8 * hd * act
    # U=4 > Hkv=2: K and V repeated to 4 heads.
    four = _rows(_cfg("hybrid", 8, 4), t)
    assert four["attention q, k, v (head layout)"] - ring["attention q, k, v"] == t * 2 * (4 - 2) * hd * act
    # Checkpointed, the all-to-all's outputs are kept too (attention is never rerun).
    kept = {r.name for r in plan.checkpointed_saved(_cfg("ulysses", 2), t, act, "full")}
    assert {"attention q, k, v (head layout)", "attention out (sequence layout)"} <= kept


def test_plan_names_the_method_and_its_traffic(compose_config):
    cfg = load_config(compose_config("model=1b", "stage=extend_128k", "parallel.cp=8", "parallel.cp_method=ulysses"))
    ring = plan.plan_stage(replace(cfg, parallel=replace(cfg.parallel, cp_method="ring")), 259, "cuda")
    uly = plan.plan_stage(cfg, 259, "cuda")
    assert uly.phases[-1].name == "last block, Ulysses attention backward"
    assert uly.activations > ring.activations
    proc = plan_cli("model=1b", "stage=extend_128k", "parallel.cp=8", "parallel.cp_method=hybrid", "parallel.ulysses=2")
    assert proc.returncode == 0, proc.stderr
    assert "dp=1 × cp=8 (hybrid 2×4)" in proc.stdout and "last block, hybrid attention backward" in proc.stdout
    assert re.search(r"communication per rank and step \(hybrid 2×4, 8 GPUs per node\): [\d.]+ GB sent", proc.stdout)


def plan_cli(*args: str):
    return run_main(plan.main, args, ROOT)


TABLE_ROW = re.compile(r"^\s+(\d+)\s+(\d+)\s+(local|ring|ulysses|hybrid)\s+(\d+)×(\d+)\s+(none|selective|full)\s+"
                       r"[\d.]+ GiB\s+(yes|no)\s+([\d.]+)\s+([\d,]+)\s", re.MULTILINE)
SHAPES = {  # nodes → the pick the model makes for the 125m model at 128K (docs/parallel.md)
    1: "parallel.cp=2 parallel.dp=4 parallel.cp_method=ring model.activation_checkpointing=none",
    4: "parallel.cp=8 parallel.dp=4 parallel.cp_method=ring model.activation_checkpointing=none",
    32: "parallel.cp=64 parallel.dp=4 parallel.cp_method=hybrid parallel.ulysses=4 model.activation_checkpointing=none",
}


@pytest.mark.parametrize("nodes", SHAPES)
def test_suggest_on_three_cluster_shapes_picks_a_valid_method_and_is_what_the_docs_show(nodes, compose_config):
    command = f"python -m longtrain.plan stage=extend_128k --suggest --nodes {nodes}"
    proc = plan_cli(*command.split()[3:])
    assert proc.returncode == 0, proc.stderr
    world = nodes * 8
    rows = TABLE_ROW.findall(proc.stdout)
    assert rows and all(int(cp) * int(dp) == world and int(u) * int(r) == int(cp) for cp, dp, _, u, r, *_ in rows)
    assert {m for _, _, m, *_ in rows} >= {"ring", "hybrid"}
    picked = re.search(r"^  suggest: (.*?) \(peak", proc.stdout, re.MULTILINE).group(1)
    assert picked == SHAPES[nodes]
    cfg = load_config(compose_config("stage=extend_128k", *picked.split()))  # the pick validates as train.py would
    assert cfg.parallel.dp * cfg.parallel.cp == world
    assert len(re.findall(r"^    (why|next): ", proc.stdout, re.MULTILINE)) == 2
    shown = all_examples()[command]
    printed = proc.stdout[proc.stdout.index("  context parallelism on"):].rstrip("\n").splitlines()
    assert shown == printed, "docs/parallel.md's --suggest output is stale: paste the command's output"


@pytest.mark.parametrize("args,line", [
    (["--nodes", "0"], "config error: --nodes: must be > 0, got 0"),
    (["--nodes", "two"], "config error: argument --nodes: invalid int value: 'two'"),
    (["--gpus-per-node", "-8"], "config error: --gpus-per-node: must be > 0, got -8"),
    (["--intra-gbps", "fast"], "config error: --intra-gbps: 'fast' is not a bandwidth; valid: e.g. 450 (GB/s), 450GB/s, 400Gb/s"),
    (["--inter-latency-us", "0"], "config error: --inter-latency-us: must be > 0, got 0"),
    (["--nodes", "4", "--world-size", "8"], "config error: --world-size: 8 is not --nodes × --gpus-per-node = 32"),
    (["parallel.cp_method=star"], "config error: parallel.cp_method: unknown value 'star'; valid: ring, ulysses, hybrid"),
])
def test_bad_flag_is_one_config_error_line(args, line):
    proc = plan_cli("stage=extend_128k", "--suggest", *args)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.strip() == line


def test_rates_in_bytes_or_bits():
    assert parse_rate("450", "--intra-gbps") == 450e9
    assert parse_rate("400Gb/s", "--inter-gbps") == parse_rate("50GB/s", "--inter-gbps") == 50e9


def test_suggest_says_when_nothing_fits_and_names_the_smallest():
    proc = plan_cli("stage=extend_128k", "--suggest", "--nodes", "1", "--device-memory", "1GB")
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if "suggest:" in x)
    assert re.fullmatch(r"  suggest: nothing fits 1 GB .* on 8 devices \(cp in \[2, 4, 8\], modes none, selective, full\); "
                        r"the smallest peak is [\d.]+ GiB: parallel.cp=8 parallel.dp=1 parallel.cp_method=ring "
                        r"model.activation_checkpointing=full", line), line


@pytest.mark.parametrize("method,cp,u", [("ring", 4, 1), ("ulysses", 4, 1), ("hybrid", 8, 4)])
def test_evaluation_counts_the_attention_buffers_of_each_method(method, cp, u):
    cfg = _cfg(method, cp, u)
    p = plan.plan_stage(cfg, 300, "cpu")  # fp32: 4 bytes
    t, hq, hkv, d = p.tokens, 8 * 8, 2 * 8, 64
    hkv_u = max(2, cfg.parallel.ulysses_degree()) * 8
    qkvo = t * (2 * hq + 2 * hkv) * 4
    head_layout = t * (2 * hq + 2 * hkv_u) * 4 if method != "ring" else 0
    in_flight = 2 * 2 * hkv_u * t * 4 + t * (hq + 8) * 4 if method != "ulysses" else 0
    row = next(r for r in p.evaluation if r.name == "evaluation: a block's attention")
    assert row.bytes == 2 * t * d * 4 + qkvo + head_layout + in_flight
