"""The memory planner (longtrain/plan.py): its activation accounting against what autograd
really saves, --suggest, its error line and the README's plan commands."""

from __future__ import annotations

import gc
import re
import subprocess
import weakref
from dataclasses import replace

import pytest
import torch

from longtrain.config import Config, ModelConfig, RopeConfig
from longtrain.model.transformer import Transformer
from longtrain.parallel.activation_checkpointing import apply_activation_checkpointing
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from longtrain import plan
from longtrain.plan import block_saved, checkpointed_saved, mlp_tiled, outside_saved, plan_stage, suggest
from tests.cli_utils import ROOT, run_main


def saved_bytes(model: torch.nn.Module, run) -> int:
    """Bytes of every distinct storage autograd saves while ``run()`` executes, parameters
    excluded (the independent reference: torch's saved-tensor hooks see each one)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values())


class _OpOutputs(TorchDispatchMode):
    """Every storage an op creates, by weak reference (alive exactly while anything holds it)."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, tuple[weakref.ref, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                self.storages[s.data_ptr()] = (weakref.ref(s), s.nbytes())
        return out


def bytes_left_alive(model: torch.nn.Module, run) -> int:
    """Bytes of the storages ops create while ``run()`` executes that are still alive after
    it, less its result's and the model's own (views of parameters): what the forward leaves
    for the backward however it is held (autograd's saved tensors, a checkpoint's inputs, a
    checkpoint policy's cache)."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    with _OpOutputs() as mode:
        result = run()
    gc.collect()
    alive = sum(n for ptr, (ref, n) in mode.storages.items() if ref() is not None and ptr not in own)
    return alive - result.untyped_storage().nbytes()


def _model(qk_norm: bool = True, checkpointing: str = "none", mlp_tile_tokens: int = 0) -> tuple[Config, Transformer]:
    cfg = Config(model=ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, qk_norm=qk_norm,
                                   activation_checkpointing=checkpointing, mlp_tile_tokens=mlp_tile_tokens))
    torch.manual_seed(0)
    model = Transformer(cfg.model, RopeConfig(), vocab_size=300)
    apply_activation_checkpointing(model.layers, checkpointing)
    return cfg, model


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("qk_norm", [True, False])
def test_block_accounting_equals_what_autograd_saves(dtype, qk_norm):
    cfg, model = _model(qk_norm)
    B, T = 2, 48
    ids = torch.randint(0, 256, (B, T))
    pos = torch.arange(T).expand(B, T)
    act = 2 if dtype == "bfloat16" else 4
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    h = model.tok_embeddings(ids).detach().requires_grad_()
    cos, sin = model.rotary(pos)

    def one_block():
        with autocast:
            model.layers[0](h, cos, sin, model.attention_fn)

    # cos/sin are the model's (shared by blocks), counted outside: exclude them here.
    shared = cos.untyped_storage().nbytes() + sin.untyped_storage().nbytes()
    assert saved_bytes(model, one_block) - shared == sum(r.bytes for r in block_saved(cfg, B * T, act))

    def whole_model():
        with autocast:
            model.hidden_states(ids, pos)

    outside = [r for r in outside_saved(cfg, B * T, 300, act) if r.name != "loss gradients"]  # no loss run
    expected = cfg.model.n_layers * sum(r.bytes for r in block_saved(cfg, B * T, act)) + sum(r.bytes for r in outside)
    assert saved_bytes(model, whole_model) == expected


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode,tile", [("full", 0), ("selective", 0), ("none", 16), ("full", 16), ("selective", 16)])
def test_checkpointed_accounting_equals_what_the_forward_leaves_alive(mode, tile, dtype):
    """A checkpoint (a block's, a MLP tile's) hides its saves from saved-tensor hooks, so
    the reference here is every storage the forward leaves alive. That count differs from
    the saved set by a constant (the token ids come from outside, a few bytes more stay
    alive), which the plain model measures: the planner's other modes must differ from it
    by what they measure."""
    B, T = 2, 48
    ids = torch.randint(0, 256, (B, T))
    pos = torch.arange(T).expand(B, T)
    act = 2 if dtype == "bfloat16" else 4

    def leftover(mode: str, tile: int) -> int:
        cfg, model = _model(checkpointing=mode, mlp_tile_tokens=tile)

        def forward():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                return model.hidden_states(ids, pos)

        tiled = mlp_tiled(cfg, T)
        assert tiled == bool(tile)
        per_block = block_saved(cfg, B * T, act, tiled) if mode == "none" else checkpointed_saved(cfg, B * T, act, mode)
        outside = [r for r in outside_saved(cfg, B * T, 300, act) if r.name != "loss gradients"]  # no loss run
        planned = cfg.model.n_layers * sum(r.bytes for r in per_block) + sum(r.bytes for r in outside)
        return bytes_left_alive(model, forward) - planned

    assert leftover(mode, tile) == leftover("none", 0)
    assert abs(leftover("none", 0)) < B * T * 8  # at most the token ids' size, against ~1 MB planned


def test_suggest_takes_the_smallest_cp_then_the_cheapest_checkpointing(compose_config):
    from longtrain.run_config import load_config

    cfg = load_config(compose_config("model=1b", "stage=extend_32k", "parallel.dp=8"))

    def peak(cp: int, mode: str) -> int:
        return plan_stage(replace(cfg, parallel=replace(cfg.parallel, dp=8 // cp, cp=cp)), 259, "cuda", mode).peak

    assert peak(1, "none") > peak(1, "selective") > peak(1, "full")  # checkpointing saves memory
    assert peak(1, "none") > peak(2, "none") > peak(4, "none")  # so does cp
    assert suggest(cfg, 259, "cuda", peak(1, "none"), world=8)[:2] == (1, "none")
    assert suggest(cfg, 259, "cuda", (peak(1, "none") + peak(1, "selective")) // 2, world=8)[:2] == (1, "selective")
    assert suggest(cfg, 259, "cuda", peak(1, "full"), world=8)[:2] == (1, "full")
    # Below cp=1's smallest: cp=2 with its first mode that fits.
    below = peak(1, "full") - 1
    assert peak(2, "selective") > below >= peak(2, "full")
    assert suggest(cfg, 259, "cuda", below, world=8)[:2] == (2, "full")
    assert suggest(cfg, 259, "cuda", 1, world=8) is None
    # The README's table: 1b at 128K on 8 × 80 GB (a global batch of 4 allows dp ≤ 4).
    long = load_config(compose_config("model=1b", "stage=extend_128k"))
    assert suggest(long, 259, "cuda", 80 * 10**9, world=8)[:2] == (2, "full")


def plan_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m longtrain.plan ARGS``, in this process."""
    return run_main(plan.main, args, ROOT)


@pytest.mark.parametrize("args,line", [
    (["model=bogus"], "config error: model: unknown option 'bogus'; valid: 125m, 1b, 350m, hf, tiny"),
    (["stage=extend_32k", "parallel.cp=3"], "config error: stage.seq_len: 32768 is not divisible by 2*parallel.cp=6"),
    (["--device-memory", "lots"], "config error: --device-memory: 'lots' is not a size; valid: e.g. 80GB, 141GB, 24GiB"),
])
def test_bad_input_is_one_config_error_line(args, line):
    proc = plan_cli(*args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().startswith(line) and len(proc.stderr.strip().splitlines()) == 1


def readme_plan_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    return [line.split("#")[0].split()[3:] for line in re.findall(r"^python -m longtrain\.plan.*$", text, re.MULTILINE)]


def test_readme_plan_commands_run():
    commands = readme_plan_commands()
    assert commands, "the README shows no python -m longtrain.plan command"
    for args in commands:
        proc = plan_cli(*args)
        assert proc.returncode == 0, proc.stderr
        assert "predicted peak per rank" in proc.stdout
        if "--suggest" in args:
            assert "suggest: parallel.cp=" in proc.stdout


def test_plan_reports_the_evaluation_peak_within_the_training_step(compose_config):
    """The gate's evaluation holds one [chunk, vocab] block of logits, never [T, vocab]: at
    128K tokens and a 32K vocabulary its peak stays within the training step's."""
    from longtrain.run_config import load_config

    cfg = load_config(compose_config("model=1b", "stage=extend_128k", "parallel.dp=1", "parallel.cp=8"))
    p = plan_stage(cfg, 32000, "cuda")
    assert any("[256, 32000] logits" in r.note for r in p.evaluation)
    assert sum(r.bytes for r in p.state) < p.eval_peak <= p.peak
    assert "evaluation peak per rank" in plan.format_plan(p)


def test_fsdp_mixed_precision_has_no_autocast_weight_copies(compose_config):
    """bf16 on CUDA over several ranks runs FSDP2's mixed-precision policy: the blocks get
    bf16 parameters, so no linear saves an autocast cast of its weight and the gathered
    parameters are half the bytes; one rank (no FSDP2) still casts."""
    from longtrain.run_config import load_config

    base = ("model=125m", "stage=extend_32k", "model.activation_checkpointing=none")
    one = plan_stage(load_config(compose_config(*base)), 32000, "cuda")
    eight = plan_stage(load_config(compose_config(*base, "parallel.dp=8")), 32000, "cuda")
    assert not one.fsdp_bf16 and eight.fsdp_bf16
    assert "bf16 weight copies" in [r.name for r in one.per_block]
    assert "bf16 weight copies" not in [r.name for r in eight.per_block]
    unsharded = next(r for r in eight.state if r.name == "FSDP2 unsharded")
    fp32 = plan_stage(load_config(compose_config(*base, "parallel.dp=8", "run.dtype=float32")), 32000, "cuda")
    assert 2 * unsharded.bytes == next(r for r in fp32.state if r.name == "FSDP2 unsharded").bytes
