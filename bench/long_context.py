"""The GPU curriculum's real lengths on the CPU: extend_32k (32,768 tokens) and extend_128k
(131,072) with the tiny model under context parallelism, as the README's commands run them.

    python -m bench.long_context --init-from CKPT                      # 32K at cp = 1, 2, 4
    python -m bench.long_context --init-from CKPT --runs 131072:4      # the 128K stage at cp=4

Each run is ``[torchrun --nproc-per-node CP] train.py preset=cpu_long stage=STAGE
parallel.cp=CP stage.init_from=CKPT`` in a fresh folder (two steps and the small gate; the
needle evaluation runs sharded over the cp ranks). Per-rank peak RSS is the high-water
mark (VmHWM) of each training process, read from /proc while it runs. Time per step
comes from the logged tokens/s. The first step's loss at cp > 1 must equal the cp=1 run's
at the same length (same weights, same batch): the script prints the comparison and exits
non-zero if it differs by more than fp32 reduction order allows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.proc_status import status_kib
from longtrain.run_files import read_gate

ROOT = Path(__file__).resolve().parents[1]
STAGES = {32768: "extend_32k", 131072: "extend_128k"}
LOSS_RTOL = 1e-4


def command(seq: int, cp: int, init_from: str, run_dir: Path, extra: list[str]) -> list[str]:
    launcher = [sys.executable] if cp == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc-per-node={cp}"]
    return [*launcher, str(ROOT / "train.py"), "preset=cpu_long", f"stage={STAGES[seq]}", f"parallel.cp={cp}",
            f"stage.init_from={init_from}", f"run.dir={run_dir}", "logging.progress=false", *extra]


def _hwm_kib(pid: int) -> int | None:
    try:
        return status_kib("VmHWM", pid)
    except OSError:  # the process has exited
        return None


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def run(seq: int, cp: int, init_from: str, extra: list[str]) -> dict:
    """Run one configuration; its first losses, step times, gate and per-rank peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        proc = subprocess.Popen(command(seq, cp, init_from, run_dir, extra), cwd=tmp, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        peaks: dict[int, int] = {}
        while proc.poll() is None:
            ranks = [proc.pid] if cp == 1 else _children(proc.pid)
            for pid in ranks:
                hwm = _hwm_kib(pid)
                if hwm is not None:
                    peaks[pid] = max(peaks.get(pid, 0), hwm)
            time.sleep(0.5)
        log = proc.stdout.read()
        if proc.returncode != 0:
            raise SystemExit(f"seq {seq} cp {cp} failed ({proc.returncode}):\n{log[-3000:]}")
        stage_dir = run_dir / STAGES[seq]
        rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if "train/loss" in r]
        gate = read_gate(stage_dir)
    return {
        "losses": [r["train/loss"] for r in train],
        # tokens_per_s is per device: a step of seq tokens took seq / (tokens_per_s · cp) seconds.
        "step_s": statistics.median(seq / (r["train/tokens_per_s"] * cp) for r in train),
        "recall_before": gate.recall_before,
        "recall": gate.recall,
        "peaks_mib": sorted(v / 1024 for v in peaks.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init-from", required=True, help="a tiny-model checkpoint folder (step_XXXXXXXX)")
    parser.add_argument("--runs", nargs="+", default=["32768:1", "32768:2", "32768:4"], help="SEQ:CP, e.g. 131072:4")
    parser.add_argument("overrides", nargs="*", help="more train.py overrides (e.g. rope=abf)")
    args = parser.parse_args()
    print(f"tiny model, preset=cpu_long (2 steps, batch 1, gate: 1 depth × 1 trial), CPU gloo, {' '.join(args.overrides)}")
    print(f"{'seq':>7} {'cp':>3} {'loss step 1':>12} {'loss step 2':>12} {'s/step':>8} {'recall before/after':>20}  peak RSS per rank (MiB)")
    first: dict[int, float] = {}
    bad = []
    for spec in args.runs:
        seq, cp = map(int, spec.split(":"))
        r = run(seq, cp, args.init_from, args.overrides)
        loss = r["losses"][0]
        second = f"{r['losses'][1]:>12.6f}" if len(r["losses"]) > 1 else f"{'-':>12}"
        print(f"{seq:>7} {cp:>3} {loss:>12.6f} {second} {r['step_s']:>8.1f} "
              f"{r['recall_before']:>9.2f} / {r['recall']:<8.2f}  {', '.join(f'{p:.0f}' for p in r['peaks_mib'])}",
              flush=True)
        if cp == 1:
            first[seq] = loss
        elif seq in first:
            diff = abs(loss - first[seq]) / first[seq]
            print(f"        first-step loss cp={cp} vs cp=1: relative difference {diff:.2e} (allowed {LOSS_RTOL:g})")
            if diff > LOSS_RTOL:
                bad.append(f"{seq} cp={cp}")
    if bad:
        raise SystemExit(f"first-step loss differs from cp=1 at: {', '.join(bad)}")


if __name__ == "__main__":
    main()
