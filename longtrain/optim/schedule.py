"""Warmup-stable-decay (WSD) learning-rate schedule (MiniCPM; Hägele et al. 2024)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def wsd_lr_ratio(
    step: int,
    total_steps: int,
    warmup_steps: int,
    decay_fraction: float,
    decay_shape: str = "1-sqrt",
    final_lr_ratio: float = 0.0,
) -> float:
    """LR as a fraction of peak at optimizer step ``step`` (0-based).

    Linear warmup reaching the peak at step ``warmup_steps - 1``, constant, then a decay over
    the last ``decay_fraction`` of the steps to ``final_lr_ratio``. The decay's progress p is 0
    at its first step and 1 at ``total_steps``; e.g. N=1000, fraction 0.2, 1-sqrt: step 900
    has p = 0.5 and ratio 1 - sqrt(0.5) = 0.2929.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = int(round(decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    if step < decay_start or decay_steps == 0:
        return 1.0
    p = min(1.0, (step - decay_start) / decay_steps)
    if decay_shape == "linear":
        shape = 1.0 - p
    elif decay_shape == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * p))
    elif decay_shape == "1-sqrt":
        shape = 1.0 - math.sqrt(p)
    else:
        raise ValueError(f"decay_shape: unknown {decay_shape!r}; valid: linear, cosine, 1-sqrt")
    return final_lr_ratio + (1.0 - final_lr_ratio) * shape


def build_wsd_scheduler(
    optimizer: Optimizer,
    total_steps: int,
    warmup_steps: int,
    decay_fraction: float,
    decay_shape: str,
    final_lr_ratio: float,
) -> LambdaLR:
    return LambdaLR(
        optimizer,
        lambda step: wsd_lr_ratio(step, total_steps, warmup_steps, decay_fraction, decay_shape, final_lr_ratio),
    )
