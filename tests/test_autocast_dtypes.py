"""The GPU dtype flow, emulated on the CPU: what dtype each attention kernel receives.

Under CUDA bf16 autocast ``aten::rms_norm`` is on the fp32 list, so QK-norm hands q and k
over as fp32 while v, from a linear layer, is bf16. CPU autocast has no rule for rms_norm
(its output stays bf16), so these tests register CUDA's rule for the CPU autocast key
(``cuda_autocast_rms_norm``) and run the real trainer step under ``run.dtype=bfloat16``
with a spy on the CPU kernels, at cp=1 (local attention) and cp=2 (ring attention over
gloo ranks). Every kernel call, forward and backward, must see q, k, v (and dout, out) in
the run's compute dtype: bf16 under autocast, fp32 without it. The losses and gradients
under bf16 must equal the fp32 ones within bf16 tolerance, locally and through the ring.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch import nn

from longtrain.attention import kernels
from longtrain.parallel.mesh import init_parallel
from longtrain.run_config import load_config
from longtrain.trainer.builder import build_trainer
from longtrain.trainer.trainer import Trainer
from tests.dist_utils import run_distributed
from tests.test_parallel_training import ROPE
from tests.test_trainer import TINY, single_process

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@contextlib.contextmanager
def cuda_autocast_rms_norm() -> Iterator[None]:
    """Give CPU autocast CUDA's rule for ``aten::rms_norm``: inputs cast to fp32, fp32 out.

    That is what CUDA autocast's fp32 policy does (cast every lower-precision floating
    input to fp32, run the op with autocast off). Registered for the AutocastCPU key only,
    so it acts under ``torch.autocast("cpu")`` and nowhere else; removed on exit.
    """
    lib = torch.library.Library("aten", "IMPL")

    def rms_norm_fp32(input, normalized_shape, weight=None, eps=None):
        with torch.autocast("cpu", enabled=False):
            weight = None if weight is None else weight.float()
            return torch.ops.aten.rms_norm(input.float(), normalized_shape, weight, eps)

    lib.impl("rms_norm", rms_norm_fp32, "AutocastCPU")
    try:
        yield
    finally:
        lib._destroy()


class KernelSpy:
    """Wraps the CPU kernels (the leaves every local and ring call reaches) and records the
    dtypes of what they receive, then calls the real kernel."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, torch.dtype]]] = []

    def install(self, patch) -> None:
        real_forward, real_backward = kernels._cpu_forward, kernels._cpu_backward

        def forward(q, k, v, causal, scale):
            self.calls.append(("forward", {"q": q.dtype, "k": k.dtype, "v": v.dtype}))
            return real_forward(q, k, v, causal, scale)

        def backward(dout, q, k, v, out, lse, causal, scale):
            names = ("dout", "q", "k", "v", "out", "lse")
            self.calls.append(("backward", {n: t.dtype for n, t in zip(names, (dout, q, k, v, out, lse))}))
            return real_backward(dout, q, k, v, out, lse, causal, scale)

        patch(kernels, "_cpu_forward", forward)
        patch(kernels, "_cpu_backward", backward)


def make_config(run_dir: Path, dtype: str, cp: int = 1):
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONFIG_DIR

    overrides = [
        *TINY, *ROPE, "model.qk_norm=true", "eval.val_every=0", f"run.dtype={dtype}",
        f"run.dir={run_dir}", f"parallel.cp={cp}",
        # At the default 0.02 the untrained model's loss is ln(vocab) to 1e-4 whatever its
        # attention does; at 0.1 attending to the future moves it by 1.2%, bf16 by 1e-4.
        "model.init_std=0.1",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return load_config(compose(config_name="config", overrides=overrides))


def first_step(trainer: Trainer, patch) -> dict:
    """One forward + backward of the trainer's first batch, with the spy and CUDA's rms_norm
    rule in place: the loss, the parameter gradients and the kernel calls (or the error)."""
    spy = KernelSpy()
    spy.install(patch)
    result: dict = {"calls": spy.calls}
    try:
        with cuda_autocast_rms_norm():
            sums = trainer.forward_backward(trainer.loader.next_batch())
    except Exception as e:  # today's mixed dtypes may crash a kernel: report, don't hide
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        return result
    result["loss"] = float(sums["ce"] / sums["tokens"])
    grads = {}
    for name, p in trainer.model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name] = g.detach().float().clone()
    result["grads"] = grads
    return result


def _cp2_worker(rank: int, world_size: int, tmp: str) -> None:
    tmp = Path(tmp)
    results = {}
    for dtype in DTYPES:
        cfg = make_config(tmp / f"cp2_{dtype}", dtype, cp=2)
        pd = init_parallel(cfg.parallel, torch.device("cpu"))
        originals = {}

        def patch(module, name, value):
            originals.setdefault(name, getattr(module, name))
            setattr(module, name, value)

        results[dtype] = first_step(build_trainer(cfg, pd), patch)
        for name, value in originals.items():
            setattr(kernels, name, value)
    torch.save(results, tmp / f"cp2_rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[tuple[int, str], dict]:
    """{(cp, dtype): first_step result}; cp=2 results are rank 0's (rank 1 is checked too)."""
    tmp = tmp_path_factory.mktemp("autocast")
    out = {}
    for dtype in DTYPES:
        with pytest.MonkeyPatch.context() as mp:
            trainer = build_trainer(make_config(tmp / f"cp1_{dtype}", dtype), single_process())
            out[(1, dtype)] = first_step(trainer, mp.setattr)
    run_distributed(_cp2_worker, 2, str(tmp), timeout=240)
    for rank in range(2):
        for dtype, result in torch.load(tmp / f"cp2_rank{rank}.pt").items():
            out[(2, dtype) if rank == 0 else (2, dtype, "rank1")] = result
    return out


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # CPU autocast's bf16 rms_norm
def test_emulation_gives_cudas_rms_norm_dtypes():
    """The emulation is what makes the bf16 test meaningful on a CPU: check it does its job."""
    norm, linear = nn.RMSNorm(16), nn.Linear(16, 16)
    x = torch.randn(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x).dtype == torch.bfloat16
        with cuda_autocast_rms_norm():
            assert norm(linear(x)).dtype == torch.float32  # CUDA's fp32 list
        assert norm(linear(x)).dtype == torch.bfloat16  # CPU autocast: no rule for rms_norm
    with cuda_autocast_rms_norm():
        assert norm(x.bfloat16()).dtype == torch.bfloat16  # outside autocast: untouched


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("cp", [1, 2])
def test_every_kernel_receives_the_compute_dtype(runs, cp, dtype):
    want = DTYPES[dtype]
    for key in [(cp, dtype)] + ([(cp, dtype, "rank1")] if cp == 2 else []):
        result = runs[key]
        calls = result["calls"]
        assert calls, f"{key}: no kernel was called ({result.get('error')})"
        wrong = [(kind, seen) for kind, seen in calls if any(seen[n] != want for n in seen if n != "lse")]
        assert not wrong, f"{key}: kernels received other dtypes than {want}: {wrong[:3]}"
        assert all(seen["lse"] == torch.float32 for kind, seen in calls if kind == "backward"), key
        assert "error" not in result, f"{key}: {result['error']}"
        assert {kind for kind, _ in calls} == {"forward", "backward"}, key


@pytest.mark.parametrize("cp", [1, 2])
def test_bf16_autocast_matches_fp32(runs, cp):
    """Local (cp=1) and ring (cp=2) attention under bf16 autocast: the fp32 loss within bf16
    tolerance, and gradients pointing the same way."""
    for key in [(c, dtype) for c in {1, cp} for dtype in DTYPES]:
        assert "error" not in runs[key], f"{key}: {runs[key].get('error')}"
    bf16, fp32 = runs[(cp, "bfloat16")], runs[(cp, "float32")]
    # bf16 rounds at 2^-9 relative; the loss, a mean over 256 tokens, lands far closer.
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=2e-3)
    assert bf16["loss"] == pytest.approx(runs[(1, "bfloat16")]["loss"], rel=2e-3)  # ring == local in bf16
    assert fp32["loss"] == pytest.approx(runs[(1, "float32")]["loss"], rel=1e-5)  # ring == local in fp32
    for name, g in fp32["grads"].items():
        cos = torch.nn.functional.cosine_similarity(bf16["grads"][name].flatten(), g.flatten(), dim=0)
        assert cos > 0.999, f"{name}: cosine {cos:.5f} between bf16 and fp32 gradients"
        assert bf16["grads"][name].norm() == pytest.approx(g.norm().item(), rel=2e-2), name
