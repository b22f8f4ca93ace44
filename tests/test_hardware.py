"""Start-up checks of the device a run gets, and its MFU peak, with the device's facts faked:
the CUDA rules are tested on a CPU, and through train.py with torch.cuda's answers replaced."""

import subprocess
import sys
import textwrap

import pytest
import torch

from longtrain import hardware
from longtrain.config import ConfigError
from longtrain.hardware import check_backend, peak_bf16_tflops, run_compute_dtype
from longtrain.run_config import load_config
from longtrain.trainer.meter import detect_peak_tflops
from tests.cli_utils import ROOT, train_in_process

H100 = dict(capability=(9, 0), device_name="NVIDIA H100 80GB HBM3")
T4 = dict(capability=(7, 5), device_name="Tesla T4")
RTX3090 = dict(capability=(8, 6), device_name="NVIDIA GeForce RTX 3090")
RTX4090 = dict(capability=(8, 9), device_name="NVIDIA GeForce RTX 4090")
B200 = dict(capability=(10, 0), device_name="NVIDIA B200")


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),  # SXM
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA A100-PCIE-40GB", 312.0),
        ("NVIDIA GeForce RTX 4090", None),
        ("Tesla T4", None),
    ],
)
def test_peak_by_device_name(name, peak, monkeypatch):
    assert peak_bf16_tflops(name) == peak
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert detect_peak_tflops(torch.device("cuda", 0)) == peak  # what the trainer logs MFU against
    assert detect_peak_tflops(torch.device("cpu")) is None


def test_compute_dtype_of_a_run():
    assert run_compute_dtype("auto", "cuda") == torch.bfloat16
    assert run_compute_dtype("bfloat16", "cuda") == torch.bfloat16
    assert run_compute_dtype("float32", "cuda") == torch.float32
    assert run_compute_dtype("auto", "cpu") == torch.float32
    assert run_compute_dtype("bfloat16", "cpu") == torch.bfloat16


@pytest.mark.parametrize("model", ["125m", "350m", "1b", "tiny"])
def test_shipped_models_pass_on_gpus(compose_config, model):
    cfg = load_config(compose_config("stage=pretrain", f"model={model}"))
    assert check_backend(cfg, "cuda", **H100) == "sdpa_flash"
    assert check_backend(cfg, "cuda", flash_attn_version="2.8.3", **H100) == "flash_attn"
    assert check_backend(cfg, "cuda", capability=(8, 0), flash_attn_version="2.7.0") == "flash_attn"
    cfg.run.dtype = "float32"
    assert check_backend(cfg, "cuda", **T4) == "efficient"  # fp32 runs where bf16 flash cannot


def test_cpu_has_no_kernel_preconditions(compose_config):
    for dtype in ("auto", "float32", "bfloat16"):
        cfg = load_config(compose_config("stage=pretrain", "model.head_dim=6", f"run.dtype={dtype}"))
        assert check_backend(cfg, "cpu") == "cpu"


@pytest.mark.parametrize(
    "overrides,facts,key,fix",
    [
        ([], T4, "run.dtype", "run.dtype=float32"),  # bf16 flash needs sm80+
        (["run.dtype=bfloat16"], dict(capability=(7, 0), device_name="Tesla V100-SXM2-16GB"), "run.dtype", "sm70"),
        (["model.head_dim=100"], H100, "model.head_dim", "multiple of 8"),
        (["model.head_dim=320"], H100, "model.head_dim", "no larger than 256"),
        (["model.dim=840"], H100, "model.head_dim", "model.dim / model.n_heads = 840/12"),  # 70, derived
        (["model.head_dim=66", "run.dtype=float32"], dict(capability=(8, 0)), "model.head_dim", "multiple of 4"),
        ([], dict(flash_attn_version="2.6.3", **H100), "flash_attn", "pip install 'flash-attn>=2.7'"),
        (["model.head_dim=208"], RTX4090, "model.head_dim", "no backward in torch's flash attention kernel on sm86/sm89"),
        (["model.head_dim=224"], RTX3090, "model.head_dim", "(192, 224]"),
        ([], dict(flash_attn_version="2.7.2", **B200), "flash_attn", "pip install 'flash-attn>=2.7.3'"),
        ([], dict(flash_attn_version="2.7.0", capability=(12, 0)), "flash_attn", "sm8x and sm90 only"),
    ],
)
def test_precondition_failure_is_one_line(compose_config, overrides, facts, key, fix):
    cfg = load_config(compose_config("stage=pretrain", *overrides))
    with pytest.raises(ConfigError) as err:
        check_backend(cfg, "cuda", **facts)
    message = str(err.value)
    assert message.startswith(key + ":") and "\n" not in message and fix in message, message


@pytest.mark.parametrize("head_dim", [192, 232, 256])
def test_sdpa_flash_backward_rule_is_only_192_to_224_on_sm86_sm89(compose_config, head_dim):
    cfg = load_config(compose_config("stage=pretrain", f"model.head_dim={head_dim}"))
    assert check_backend(cfg, "cuda", **RTX4090) == "sdpa_flash"
    cfg.model.head_dim = 208
    assert check_backend(cfg, "cuda", **H100) == "sdpa_flash"  # sm90 has the backward
    assert check_backend(cfg, "cuda", capability=(8, 0)) == "sdpa_flash"
    assert check_backend(cfg, "cuda", flash_attn_version="2.8.3", **RTX4090) == "flash_attn"  # the rule is torch's kernel's only


@pytest.mark.parametrize("version,facts,ok", [
    ("2.7.2", H100, True), ("2.7.0", RTX3090, True), ("2.7.1", dict(capability=(8, 0)), True),
    ("2.7.3", B200, True), ("2.8.3", dict(capability=(12, 0)), True), ("2.7.2", B200, False),
])
def test_flash_attn_2_7_0_to_2_7_2_only_on_sm8x_sm90(compose_config, version, facts, ok):
    cfg = load_config(compose_config("stage=pretrain"))
    if ok:
        assert check_backend(cfg, "cuda", flash_attn_version=version, **facts) == "flash_attn"
    else:
        with pytest.raises(ConfigError, match="sm8x and sm90 only"):
            check_backend(cfg, "cuda", flash_attn_version=version, **facts)


def test_fp32_head_dim_alignment_is_a_sm80_rule(compose_config):
    cfg = load_config(compose_config("stage=pretrain", "model.head_dim=66", "run.dtype=float32"))
    assert check_backend(cfg, "cuda", **T4) == "efficient"


# train.py on a machine that answers as the GPU named would: in this process with torch.cuda's
# answers and the installed flash-attn's version replaced, and (e2e) as a user runs it, with
# the fakes in before longtrain is imported (flash-attn is looked for at import).
FAKE_GPU = textwrap.dedent(
    """
    import os, runpy, sys, types
    import torch
    name, major, minor, flash_version = sys.argv[1:5]
    torch.cuda.is_available = lambda: True
    torch.cuda.get_device_capability = lambda device=None: (int(major), int(minor))
    torch.cuda.get_device_name = lambda device=None: name
    if flash_version != "none":
        flash_attn = types.ModuleType("flash_attn")
        flash_attn.__version__ = flash_version
        interface = types.ModuleType("flash_attn.flash_attn_interface")
        interface._flash_attn_forward = interface._flash_attn_backward = None
        flash_attn.flash_attn_interface = interface
        sys.modules.update({"flash_attn": flash_attn, "flash_attn.flash_attn_interface": interface})
    sys.argv = [sys.argv[5], *sys.argv[6:]]
    sys.path.insert(0, os.path.dirname(sys.argv[0]))  # as `python train.py` would
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)
GPU_CASES = [
    (("Tesla T4", 7, 5, "none"), [], "config error: run.dtype: auto runs bf16 flash attention"),
    (("NVIDIA H100 80GB HBM3", 9, 0, "none"), ["model.head_dim=100"], "config error: model.head_dim: 100 "),
    (("NVIDIA H100 PCIe", 9, 0, "2.6.3"), [], "config error: flash_attn: version 2.6.3 is installed"),
]


def fake_gpu(monkeypatch: pytest.MonkeyPatch, name: str, major: int, minor: int, flash_version: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (int(major), int(minor)))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(hardware, "FLASH_ATTN_VERSION", None if flash_version == "none" else flash_version)


def assert_exits_2_before_any_compute(proc: subprocess.CompletedProcess, tmp_path, expected: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []  # nothing written: no run dir, no Hydra outputs


@pytest.mark.parametrize("gpu,overrides,expected", GPU_CASES)
def test_cli_precondition_failure_exits_2_before_any_compute(tmp_path, monkeypatch, gpu, overrides, expected):
    fake_gpu(monkeypatch, *gpu)
    proc = train_in_process("run.device=cuda", f"run.dir={tmp_path / 'run'}", *overrides, cwd=tmp_path)
    assert_exits_2_before_any_compute(proc, tmp_path, expected)


@pytest.mark.e2e
def test_cli_precondition_failure_as_a_process(tmp_path):
    gpu, overrides, expected = GPU_CASES[-1]  # the flash-attn found when longtrain is imported
    proc = subprocess.run(
        [sys.executable, "-c", FAKE_GPU, *map(str, gpu), str(ROOT / "train.py"), "run.device=cuda",
         f"run.dir={tmp_path / 'run'}", *overrides],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert_exits_2_before_any_compute(proc, tmp_path, expected)
