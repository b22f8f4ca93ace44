"""Throughput and progress of a stage: tokens/s, TFLOP/s and MFU per log window, the
step of total, time elapsed and time left for a person watching the terminal, and before
the first step an estimate of the stage's wall time."""

from __future__ import annotations

import functools
import time
from typing import Optional

import torch

from longtrain.config import Config
from longtrain.hardware import peak_bf16_tflops


def flops_per_token(cfg: Config, non_embedding_params: int) -> float:
    """Training FLOPs per token, torchtitan's convention: 6N + 6·layers·heads·head_dim·seq.

    N excludes the embedding (a lookup, not a matmul); the attention term counts the full
    T×T score matrix (no causal discount), so MFU is comparable with torchtitan's.
    """
    m = cfg.model
    return 6 * non_embedding_params + 6 * m.n_layers * m.n_heads * m.resolved_head_dim() * cfg.stage.seq_len


def detect_peak_tflops(device: torch.device) -> Optional[float]:
    """Dense bf16 peak TFLOP/s of a known GPU (H100 SXM / PCIe / NVL told apart), for MFU
    when logging.peak_tflops is not given."""
    if device.type != "cuda":
        return None  # no meaningful peak for a CPU: set logging.peak_tflops to get MFU
    return peak_bf16_tflops(torch.cuda.get_device_name(device))


# On a GPU the estimate assumes this share of the peak (a well-tuned run reaches 40-50%).
ASSUMED_GPU_MFU = 0.4
# The CPU probe: square fp32 matmuls of this size, for about this long (once per process).
CPU_PROBE_SIZE, CPU_PROBE_S = 512, 0.2
# Share of the probe's rate a training step reaches on a CPU (norms, softmax, the optimizer
# and small matmuls are slower than the probe). Measured on the CPU demo's stages: docs/operations.md.
CPU_TRAINING_SHARE = 0.5
# A CPU stage estimated beyond this is a GPU stage: the line names the CPU demo instead.
CPU_HOURS_LIMIT = 12


@functools.cache
def cpu_matmul_tflops() -> float:
    """This CPU's fp32 matmul rate, measured now (a fraction of a second, cached per process).

    Constant inputs, not random ones: the probe must not draw from the RNG a run replays.
    """
    a = torch.full((CPU_PROBE_SIZE, CPU_PROBE_SIZE), 0.5)
    a @ a  # warm-up: thread pool and allocator
    reps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < CPU_PROBE_S:
        a @ a
        reps += 1
    return 2 * CPU_PROBE_SIZE**3 * reps / elapsed / 1e12


def training_tflops(device: torch.device, peak_tflops: Optional[float]) -> Optional[tuple[float, str]]:
    """The TFLOP/s per device a training step is expected to reach, and how that was found;
    None for a GPU whose peak is unknown (logging.peak_tflops names it)."""
    if device.type == "cpu":
        rate = cpu_matmul_tflops() * CPU_TRAINING_SHARE
        return rate, f"{rate * 1e3:.1f} GFLOP/s from a matmul measured on this CPU"
    if not peak_tflops:
        return None
    return peak_tflops * ASSUMED_GPU_MFU, f"{peak_tflops:g} TFLOP/s peak at an assumed {ASSUMED_GPU_MFU:.0%} MFU"


def estimate_line(cfg: Config, non_embedding_params: int, steps: int, world_size: int, device: torch.device,
                  peak_tflops: Optional[float]) -> str:
    """``stage NAME: estimated H:MM:SS for N steps (...)``: FLOPs as the meter counts them
    against the device's speed; the progress lines' ETA refines it once steps are timed."""
    s = cfg.stage
    flops = flops_per_token(cfg, non_embedding_params) * s.global_batch_size * s.seq_len * steps
    speed = training_tflops(device, peak_tflops)
    if speed is None:
        return f"stage {s.name}: {flops:.2g} FLOPs for {steps} steps; no time estimate (unknown GPU: set logging.peak_tflops)"
    seconds = flops / (speed[0] * 1e12 * world_size)
    line = f"stage {s.name}: estimated {rough_duration(seconds)} for {steps} steps (an estimate: {flops:.2g} FLOPs at {speed[1]}; the ETA refines it)"
    if device.type == "cpu" and seconds > CPU_HOURS_LIMIT * 3600:
        line += "; far beyond what a CPU finishes in hours (a GPU stage): on a CPU run preset=cpu_demo"
    return line


def rough_duration(seconds: float) -> str:
    """:func:`duration`, or whole days beyond two of them (an estimate is no more precise)."""
    return duration(seconds) if seconds < 2 * 86400 else f"{seconds / 86400:,.0f} days"


def duration(seconds: float) -> str:
    """``1:02:03`` or ``2:03`` (hours only when there are some)."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Meter:
    """Counts the tokens of each optimizer step; at a log step, turns the window since the
    last one into tokens/s per device, TFLOP/s and (given a peak) MFU.

    Throughput counts every token processed, not only the labelled ones (answer-only
    retrieval samples label a few percent of theirs).
    """

    def __init__(self, log_every: int, tokens_per_step: int, world_size: int, flops_per_token: float,
                 peak_tflops: Optional[float]):
        self.log_every = log_every
        self.tokens_per_step = tokens_per_step
        self.world_size = world_size
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops
        self.start(0)

    def start(self, step: int) -> None:
        """A (re)started loop at ``step``: the window and the clock for the ETA begin now."""
        self.restart_window()
        self.started, self.first_step = time.perf_counter(), step

    def count_step(self) -> None:
        self.window_tokens += self.tokens_per_step

    def should_log(self, step: int, last_step: bool) -> bool:
        return step % self.log_every == 0 or last_step

    def throughput(self) -> dict[str, float]:
        """The window's tokens/s per device, TFLOP/s and MFU; the next window starts now."""
        elapsed = time.perf_counter() - self.window_start
        # Per device, after sharding: tokens this window ÷ time ÷ world size.
        metrics = {"tokens_per_s": self.window_tokens / elapsed / self.world_size}
        metrics["tflops"] = metrics["tokens_per_s"] * self.flops_per_token / 1e12
        if self.peak_tflops:
            metrics["mfu"] = metrics["tflops"] / self.peak_tflops
        self.restart_window()
        return metrics

    def restart_window(self) -> None:
        self.window_start, self.window_tokens = time.perf_counter(), 0

    def progress(self, step: int, total: int) -> str:
        """``step 120/450  2:03 elapsed  ETA 5:40``: the ETA from this loop's pace so far."""
        elapsed = time.perf_counter() - self.started
        done = step - self.first_step
        eta = duration(elapsed / done * (total - step)) if done > 0 else "-"
        return f"step {step}/{total}  {duration(elapsed)} elapsed  ETA {eta}"
