"""What the device runs, checked at start-up: the run's compute dtype, the attention kernel
it selects and that kernel's preconditions, and the device's peak TFLOP/s for MFU.

The decisions are pure functions of facts passed in (device type, compute capability,
flash-attn version, device name), so the CUDA rules are tested on a CPU; ``check_device``
gathers the facts of the real device. ``longtrain/preflight.py`` calls it once per stage config before
any compute: a failure is a ``ConfigError``, one line that says what to change, exit 2.

The kernels are called below torch's and flash-attn's public APIs (for the per-row
logsumexp ring attention merges with), so the padding and checks those APIs do are not
there to catch what the kernels cannot take:

- bf16 on CUDA runs flash attention (flash-attn when installed, else torch's bundled
  kernel): compute capability 8.0 or newer, head_dim a multiple of 8 and at most 256,
  and flash-attn >= 2.7 (the private entry points we call changed signature before it).
- torch's bundled flash kernel has no backward for head_dim in (192, 224] on sm86/sm89
  (consumer Ampere/Ada: too little shared memory per SM); the forward would run and the
  first backward fail.
- flash-attn 2.7.0–2.7.2 were built for sm8x and sm90 only: on any other device
  (Blackwell sm100/sm120) they import and then fail at the first kernel call.
- fp32 on CUDA runs torch's memory-efficient kernel: head_dim a multiple of 4 on sm80+
  (torch's own dispatch rule for it).
- The CPU kernel takes any even head_dim (RoPE's rule, checked with the config).
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from longtrain.attention.kernels import FLASH_ATTN_VERSION, kernel_backend
from longtrain.config import Config, ConfigError

FLASH_MIN_CAPABILITY = (8, 0)
FLASH_MAX_HEAD_DIM = 256
FLASH_ATTN_MIN_VERSION = (2, 7)
SDPA_FLASH_NO_BACKWARD_HEAD_DIM = (192, 224)  # exclusive, inclusive: (192, 224]
SDPA_FLASH_NO_BACKWARD_CAPABILITIES = ((8, 6), (8, 9))
FLASH_ATTN_SM8X_SM90_ONLY = ((2, 7, 0), (2, 7, 2))  # releases built for sm8x and sm90 only

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, by device name as
# torch.cuda.get_device_name reports it ("NVIDIA H100 80GB HBM3" is the SXM part, "NVIDIA
# H100 PCIe", "NVIDIA H100 NVL"). Matched in order, the first substring wins: a variant
# comes before its family.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIE", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),  # SXM, GH200
    ("A100", 312.0),  # SXM and PCIe alike
)


def peak_bf16_tflops(device_name: str) -> Optional[float]:
    """The dense bf16 peak of a GPU by its name, or None when it is not in the table."""
    name = re.sub(r"[-_\s]+", " ", device_name.upper())
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def autocast_dtype(run_dtype: str, device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype of ``run.dtype`` on a device, or None for none: bf16 for
    ``bfloat16``, and for ``auto`` on CUDA; otherwise the run is fp32."""
    if run_dtype == "bfloat16" or (run_dtype == "auto" and device_type == "cuda"):
        return torch.bfloat16
    return None


def run_compute_dtype(run_dtype: str, device_type: str) -> torch.dtype:
    """The dtype q, k, v reach the attention kernels in (see ``longtrain.attention.kernels``)."""
    return autocast_dtype(run_dtype, device_type) or torch.float32


def _version(text: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a version string; a missing patch reads as 0."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return (int(match[1]), int(match[2]), int(match[3] or 0)) if match else (0, 0, 0)


def check_backend(
    cfg: Config,
    device_type: str,
    capability: Optional[tuple[int, int]] = None,
    flash_attn_version: Optional[str] = None,
    device_name: str = "",
) -> str:
    """The attention kernel the run will use ("cpu", "flash_attn", "sdpa_flash",
    "efficient"), after checking its preconditions; ``ConfigError`` (one line) if one fails.

    ``capability`` (major, minor) and ``device_name`` describe the CUDA device;
    ``flash_attn_version`` is the installed flash-attn's, None when it is not importable.
    """
    dtype = run_compute_dtype(cfg.run.dtype, device_type)
    backend = kernel_backend(device_type, dtype, has_flash_attn=flash_attn_version is not None)
    if backend == "cpu":
        return backend
    if capability is None:
        raise ValueError("check_backend needs the CUDA device's compute capability")
    head_dim = cfg.model.resolved_head_dim()
    m = cfg.model
    source = "" if m.head_dim is not None else f" (model.dim / model.n_heads = {m.dim}/{m.n_heads})"
    gpu = f"{device_name or 'this GPU'} is sm{capability[0]}{capability[1]}"
    if backend in ("flash_attn", "sdpa_flash"):
        if tuple(capability) < FLASH_MIN_CAPABILITY:
            raise ConfigError(
                f"run.dtype: {cfg.run.dtype} runs bf16 flash attention on CUDA, which needs compute "
                f"capability 8.0 or newer (A100, H100, RTX 30xx and later), and {gpu}; set run.dtype=float32"
            )
        if head_dim % 8 or head_dim > FLASH_MAX_HEAD_DIM:
            or_fp32 = " or run.dtype=float32" if head_dim % 4 == 0 else ""  # the efficient kernel's rule
            raise ConfigError(
                f"model.head_dim: {head_dim}{source} does not suit the flash attention kernels that bf16 "
                f"runs on CUDA: they need a multiple of 8 no larger than {FLASH_MAX_HEAD_DIM}; set "
                f"model.head_dim (e.g. 64 or 128){or_fp32}"
            )
        if backend == "flash_attn":
            check_flash_attn_version(flash_attn_version, capability, gpu)
        else:
            check_sdpa_flash_backward(head_dim, source, capability, gpu)
    elif backend == "efficient" and tuple(capability) >= (8, 0) and head_dim % 4:
        raise ConfigError(
            f"model.head_dim: {head_dim}{source} does not suit the memory-efficient attention kernel "
            f"that fp32 runs on CUDA: on sm80 and newer ({gpu}) it needs a multiple of 4; set "
            "model.head_dim (e.g. 64 or 128)"
        )
    return backend


def check_flash_attn_version(version: str, capability: tuple[int, int], gpu: str) -> None:
    """flash-attn's version against what longtrain calls and what the device is."""
    if _version(version)[:2] < FLASH_ATTN_MIN_VERSION:
        raise ConfigError(
            f"flash_attn: version {version} is installed and longtrain needs 2.7 or newer "
            "(it calls the kernels' entry points directly); pip install 'flash-attn>=2.7', or "
            "uninstall flash-attn to use torch's flash kernel"
        )
    first, last = FLASH_ATTN_SM8X_SM90_ONLY
    if first <= _version(version) <= last and not (capability[0] == 8 or tuple(capability) == (9, 0)):
        raise ConfigError(
            f"flash_attn: version {version} is built for sm8x and sm90 only and {gpu}; "
            "pip install 'flash-attn>=2.7.3', or uninstall flash-attn to use torch's flash kernel"
        )


def check_sdpa_flash_backward(head_dim: int, source: str, capability: tuple[int, int], gpu: str) -> None:
    """torch's bundled flash backward refuses (192, 224] head dims on sm86/sm89."""
    low, high = SDPA_FLASH_NO_BACKWARD_HEAD_DIM
    if low < head_dim <= high and tuple(capability) in SDPA_FLASH_NO_BACKWARD_CAPABILITIES:
        raise ConfigError(
            f"model.head_dim: {head_dim}{source} has no backward in torch's flash attention kernel on "
            f"sm86/sm89 ({gpu}): head_dim in ({low}, {high}] trains on sm80 and sm90; set model.head_dim "
            f"(e.g. 128 or 192)"
        )


def check_device(cfg: Config, device: torch.device) -> str:
    """``check_backend`` with the facts of ``device`` and of this install."""
    if device.type != "cuda":
        return check_backend(cfg, device.type)
    return check_backend(
        cfg,
        "cuda",
        tuple(torch.cuda.get_device_capability(device)),
        FLASH_ATTN_VERSION,
        torch.cuda.get_device_name(device),
    )
