"""Throughput and progress of a stage: tokens/s, TFLOP/s and MFU per log window, and the
step of total, time elapsed and time left for a person watching the terminal."""

from __future__ import annotations

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
