"""The memory planner's prediction against the measured peak of a real training step.

    python -m bench.plan_accuracy                       # from the repo root; a few minutes
    python -m bench.plan_accuracy --only 8192:1:none:0  # one configuration (seq:cp:checkpointing:MLP tile[:dtype])

Each configuration is the CPU demo's tiny model (byte vocabulary; fp32, or bf16 autocast
with run.dtype=bfloat16, as the trainer runs it) at one length, cp, checkpointing mode
and MLP tiling, composed from train.py's overrides exactly as
``python -m longtrain.plan ... --device cpu`` composes it. It runs in fresh processes, one
per cp rank (gloo, FSDP2 and ring attention when cp > 1, built by the trainer's
``build_model``): a warm-up step at 256 tokens allocates the optimizer state, then the
peak RSS (VmHWM, reset through /proc/self/clear_refs) of one whole step at the full
length (forward, backward, clipping, AdamW) is taken over the RSS just before it. glibc's
mmap threshold is pinned at 64 KiB, so freed tensors go back to the OS and RSS follows live
memory: the CPU allocator keeps no cache, which is what the planner assumes for --device
cpu. The prediction compared is the planner's peak minus what the baseline already holds
(parameters and AdamW state); the worst rank of each configuration is reported.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.proc_status import status_kib

CONFIGS = [  # (seq_len, cp, checkpointing, MLP tile tokens: 0 = untiled[, run.dtype])
    (8192, 1, "none", 0),
    (16384, 1, "none", 0),
    (32768, 1, "none", 0),
    (16384, 2, "none", 0),
    (32768, 2, "none", 0),
    (32768, 4, "none", 0),
    (32768, 1, "selective", 0),
    (32768, 1, "full", 0),
    (32768, 2, "full", 0),
    (32768, 1, "none", 4096),
    (16384, 1, "none", 0, "bfloat16"),
    (32768, 2, "full", 0, "bfloat16"),
]
BASE = ["preset=cpu_demo", "stage=cpu/extend_8k", "run.device=cpu", "stage.global_batch_size=1"]
WARMUP_TOKENS = 256


def overrides(seq: int, cp: int, mode: str, tile: int, dtype: str = "float32") -> list[str]:
    return [*BASE, f"stage.seq_len={seq}", f"parallel.cp={cp}", f"model.activation_checkpointing={mode}",
            f"model.mlp_tile_tokens={tile}", f"run.dtype={dtype}"]


def _rank(rank: int, world: int, args: list[str], init_file: str, results: mp.SimpleQueue) -> None:
    from longtrain.hardware import autocast_dtype
    from longtrain.optim.loss import total_loss
    from longtrain.optim.optimizer import build_optimizer
    from longtrain.parallel.mesh import init_parallel
    from longtrain.parallel.sharding import zigzag_shard_batch
    from longtrain.plan import compose
    from longtrain.trainer.builder import build_model

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    (cfg,) = compose(args)
    pd = init_parallel(cfg.parallel, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(cfg, 259, pd)
    optimizer = build_optimizer(model, cfg.optim)

    def step(seq: int) -> None:
        gen = torch.Generator().manual_seed(seq)
        ids = torch.randint(0, 256, (1, seq + 1), generator=gen)
        whole = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "position_ids": torch.arange(seq)[None]}
        batch = zigzag_shard_batch(whole, pd.cp_rank, pd.cp)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_dtype(cfg.run.dtype, "cpu") is not None):
            sums = model(batch["input_ids"], batch["position_ids"], batch["labels"], cfg.optim.loss_chunk_size,
                         z_loss=cfg.optim.z_loss)
        total_loss(sums, seq).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(WARMUP_TOKENS)  # thread pools, gloo buffers, the optimizer state
    if world > 1:
        dist.barrier()
    baseline = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    step(cfg.stage.seq_len)
    seconds = time.perf_counter() - start
    results.put((rank, (status_kib("VmHWM") - baseline) * 1024, seconds))
    if world > 1:
        dist.destroy_process_group()


def measure(args: list[str], cp: int) -> tuple[int, float]:
    """(worst rank's peak bytes over its baseline, slowest rank's seconds) of one step."""
    results = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank, args=(cp, args, os.path.join(tmp, "rendezvous"), results), nprocs=cp, start_method="spawn")
    rows = [results.get() for _ in range(cp)]
    return max(r[1] for r in rows), max(r[2] for r in rows)


def predicted(args: list[str]) -> int:
    from longtrain.plan import compose, plan_stage

    (cfg,) = compose(args)
    plan = plan_stage(cfg, 259, "cpu")
    held = sum(r.bytes for r in plan.state if r.name in ("parameters", "optimizer state"))
    return plan.peak - held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None,
                        help="seq:cp:checkpointing:tile[:dtype], e.g. 32768:2:full:0 or 16384:1:none:0:bfloat16")
    args = parser.parse_args()
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))  # read by glibc in the spawned ranks
    configs = [(int(s), int(c), m, int(t), *d) for s, c, m, t, *d in (x.split(":") for x in args.only)] if args.only else CONFIGS
    print("tiny model (d=128, 2 layers, 4 q / 2 kv heads, ffn 384, byte vocab), CPU, 1 thread per rank, "
          "one training step, batch 1; peak RSS over the pre-step baseline, worst rank")
    print(f"{'seq':>7} {'cp':>3} {'checkpointing':>13} {'MLP tile':>8} {'dtype':>9} {'predicted MiB':>14} {'measured MiB':>13} {'pred/meas':>10} {'step s':>8}")
    worst = 0.0
    for seq, cp, mode, tile, *dtype in configs:
        a = overrides(seq, cp, mode, tile, *dtype)
        pred = predicted(a)
        meas, seconds = measure(a, cp)
        ratio = pred / meas
        worst = max(worst, abs(ratio - 1))
        print(f"{seq:>7} {cp:>3} {mode:>13} {tile or '-':>8} {(dtype or ['float32'])[0]:>9} {pred / 2**20:>14.1f} {meas / 2**20:>13.1f} {ratio:>10.3f} {seconds:>8.1f}", flush=True)
    print(f"largest deviation: {worst:.1%} (goal: within 15% on every configuration)")


if __name__ == "__main__":
    main()
