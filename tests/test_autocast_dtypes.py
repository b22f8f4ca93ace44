"""The GPU dtype flow, emulated on the CPU: what dtype each attention kernel receives.

Under CUDA bf16 autocast ``aten::rms_norm`` is on the fp32 list, so QK-norm hands q and k
over as fp32 while v, from a linear layer, is bf16. CPU autocast has no rule for rms_norm
(its output stays bf16), so these tests register CUDA's rule for the CPU autocast key
(``cuda_autocast_rms_norm``) and run the real trainer step under ``run.dtype=bfloat16``
with a spy on the CPU kernels, at cp=1 (local attention) and cp=2 (ring attention over
gloo ranks). Every kernel call, forward and backward, must see q, k, v (and dout, out) in
the run's compute dtype: bf16 under autocast, fp32 without it. The losses and gradients
under bf16 must equal the fp32 ones within bf16 tolerance, locally and through the ring.

The same holds with FSDP2's mixed-precision policy, which CUDA bf16 runs get (bf16
parameters, fp32 reduction; ``parallelize.mixed_precision_policy``), forced here on the
CPU ranks; and then no bf16 copy of a block's weights outlives the block's forward
(``WeightCopySpy``), which autocast's casts without the policy do.
"""

from __future__ import annotations

import contextlib
import weakref
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from longtrain.attention import kernels
from longtrain.parallel import parallelize
from longtrain.parallel.mesh import init_parallel
from longtrain.run_config import load_config
from longtrain.trainer.builder import build_trainer
from longtrain.trainer.trainer import Trainer
from tests.dist_utils import run_distributed
from tests.test_parallel_training import ROPE
from tests.test_trainer import TINY, single_process

# Its module-scoped fixture is built once: every test of the module runs on one xdist worker.
pytestmark = pytest.mark.xdist_group("autocast_dtypes")

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


class WeightCopySpy(TorchDispatchMode):
    """Weak references to every bf16 copy of a block weight made in the block's forward
    (autocast's casts, and under the policy FSDP2's unsharded bf16 parameters), and, once
    each block's forward is over (after FSDP2's reshard), how many still hold memory."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.shapes = {tuple(p.shape) for block in model.layers for p in block.parameters() if p.ndim == 2}
        self.refs: list[weakref.ref] = []
        self.alive_after_block: list[int] = []
        self.seen_in_block: list[int] = []
        self.in_forward = True
        for block in model.layers:
            for module in block.modules():
                if isinstance(module, nn.Linear):  # the weight it computes with (FSDP2's unsharded one)
                    module.register_forward_pre_hook(lambda m, args: self.keep(m.weight))
            block.register_forward_hook(lambda m, args, out: self.block_done())  # after FSDP2's own
        model.register_forward_hook(lambda m, args, out: setattr(self, "in_forward", False))  # backward recomputes

    def keep(self, t: torch.Tensor) -> None:
        if self.in_forward and t.dtype == torch.bfloat16 and t.ndim == 2 and tuple(t.shape) in self.shapes:
            self.refs.append(weakref.ref(t))

    def block_done(self) -> None:
        if self.in_forward:
            self.alive_after_block.append(sum(1 for r in self.refs if (t := r()) is not None and t.untyped_storage().size()))
            self.seen_in_block.append(len(self.refs))
            self.refs.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and isinstance(out, torch.Tensor):
            self.keep(out)  # autocast's cast of a weight
        return out


def _mp_worker(rank: int, world_size: int, tmp: str) -> None:
    """cp=2 under bf16 with FSDP2's mixed-precision policy (as on CUDA) and without it."""
    tmp = Path(tmp)
    results = {}
    real_policy = parallelize.mixed_precision_policy
    for name, policy in (("mp", lambda run_dtype, device_type: real_policy(run_dtype, "cuda")), ("no_mp", None)):
        cfg = make_config(tmp / f"{name}", "bfloat16", cp=2)
        pd = init_parallel(cfg.parallel, torch.device("cpu"))
        if policy is not None:
            parallelize.mixed_precision_policy = policy
        try:
            trainer = build_trainer(cfg, pd)
        finally:
            parallelize.mixed_precision_policy = real_policy
        originals = {}

        def patch(module, attr, value):
            originals.setdefault(attr, getattr(module, attr))
            setattr(module, attr, value)

        spy = WeightCopySpy(trainer.model)
        with spy:
            results[name] = first_step(trainer, patch)
        results[name]["alive_after_block"] = spy.alive_after_block
        results[name]["seen_in_block"] = spy.seen_in_block
        results[name]["param_dtypes"] = {p.dtype for p in trainer.model.parameters()}
        for attr, value in originals.items():
            setattr(kernels, attr, value)
    torch.save(results, tmp / f"mp_rank{rank}.pt")


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


@pytest.fixture(scope="module")
def mp_runs(tmp_path_factory) -> list[dict]:
    """Each rank's {"mp" | "no_mp": first_step result + the spy's counts}."""
    tmp = tmp_path_factory.mktemp("mixed_precision")
    run_distributed(_mp_worker, 2, str(tmp), timeout=240)
    return [torch.load(tmp / f"mp_rank{rank}.pt") for rank in range(2)]


def test_the_policy_is_for_bf16_on_cuda_only():
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    assert parallelize.mixed_precision_policy("auto", "cuda") == policy
    assert parallelize.mixed_precision_policy("bfloat16", "cuda") == policy
    assert parallelize.mixed_precision_policy("float32", "cuda") is None
    for dtype in ("auto", "float32", "bfloat16"):  # CPU runs unchanged, the bf16 emulation included
        assert parallelize.mixed_precision_policy(dtype, "cpu") is None


@pytest.mark.parametrize("rank", [0, 1])
def test_mixed_precision_policy_matches_fp32(runs, mp_runs, rank):
    """Under FSDP2's policy the ranks compute with bf16 weights and reduce in fp32: loss and
    gradients as fp32's within the bf16 tolerances above; sharded weights stay fp32."""
    mp = mp_runs[rank]["mp"]
    assert "error" not in mp, mp.get("error")
    fp32 = runs[(2, "float32")] if rank == 0 else runs[(2, "float32", "rank1")]
    assert mp["param_dtypes"] == {torch.float32}
    assert mp["calls"] and all(seen[n] == torch.bfloat16 for _, seen in mp["calls"] for n in seen if n != "lse")
    assert mp["loss"] == pytest.approx(fp32["loss"], rel=2e-3)
    for name, g in fp32["grads"].items():
        cos = torch.nn.functional.cosine_similarity(mp["grads"][name].flatten(), g.flatten(), dim=0)
        assert cos > 0.999, f"{name}: cosine {cos:.5f} between bf16 (policy) and fp32 gradients"
        assert mp["grads"][name].norm() == pytest.approx(g.norm().item(), rel=2e-2), name


@pytest.mark.parametrize("rank", [0, 1])
def test_no_bf16_weight_copy_outlives_its_block(mp_runs, rank):
    n_blocks, n_linears = 2, 7  # TINY's model.n_layers; wq, wk, wv, wo, w1, w2, w3
    mp = mp_runs[rank]["mp"]
    assert mp["seen_in_block"] == [n_linears] * n_blocks  # FSDP2's unsharded bf16 weights, no autocast cast
    assert mp["alive_after_block"] == [0] * n_blocks
    # The spy sees them: without the policy autocast's bf16 casts of the weights live on
    # (saved for the backward), one per linear of the block.
    assert all(alive > 0 for alive in mp_runs[rank]["no_mp"]["alive_after_block"]), mp_runs[rank]["no_mp"]["alive_after_block"]
