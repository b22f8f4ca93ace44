"""model.compile: torch.compile'd blocks train like eager ones (loss, gradients), keep
their parameter names, and keep activation checkpointing's promise not to rerun the ring
or Ulysses."""

from pathlib import Path

import pytest
import torch

from longtrain.config import ModelConfig, RopeConfig
from longtrain.model.transformer import Transformer
from longtrain.parallel.mesh import init_parallel
from longtrain.parallel.parallelize import apply_compile
from longtrain.parallel.sharding import zigzag_positions, zigzag_shard
from longtrain.trainer.builder import build_model
from tests.dist_utils import run_distributed
from tests.test_activation_checkpointing import SEQ, VOCAB, _run_model, counting, loss_and_grads

# Inductor fuses and reorders float sums; fp32 results agree to rounding, not bit for bit.
TOL = dict(rtol=1e-4, atol=1e-5)


def assert_close(got, want) -> None:
    torch.testing.assert_close(got[0], want[0], **TOL)
    assert got[1].keys() == want[1].keys()
    for name in got[1]:
        torch.testing.assert_close(got[1][name], want[1][name], **TOL, msg=name)


@pytest.mark.e2e  # Inductor compiles C++ on the CPU: 5-20 s a case
@pytest.mark.parametrize("mode,documents", [("none", False), ("full", False), ("none", True)])
def test_compiled_blocks_match_eager(mode, documents):
    torch._dynamo.reset()
    eager, eager_calls = _run_model(mode, documents)
    compiled, calls = _run_model(mode, documents, compile=True)
    assert_close(compiled, eager)
    # The attention op runs once per layer, compiled or not: under full checkpointing
    # the compiled backward reuses its saved output as the eager one does.
    assert calls["attention"] == eager_calls["attention"] == 3


def test_compiled_in_place_keeps_parameter_names():
    """The names checkpoints and exports use are a plain model's."""
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2)
    model = Transformer(cfg, RopeConfig(), VOCAB)
    apply_compile(model)
    assert list(model.state_dict()) == list(Transformer(cfg, RopeConfig(), VOCAB).state_dict())


def _cp2_worker(rank: int, world_size: int, tmp: str, method: str) -> None:
    from tests.test_parallel_training import make_config

    results = {}
    for compile in (False, True):
        extra = ("model.activation_checkpointing=full", f"model.compile={compile}", f"parallel.cp_method={method}")
        cfg = make_config(Path(tmp) / str(compile), cp=2, extra=extra)
        pd = init_parallel(cfg.parallel, torch.device("cpu"))
        torch.manual_seed(0)
        model = build_model(cfg, VOCAB, pd)  # ring attention + FSDP2 + checkpointing (+ compile)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, VOCAB, (2, SEQ), generator=g)
        local = zigzag_shard(ids, pd.cp_rank, 2)
        pos = zigzag_positions(SEQ, pd.cp_rank, 2)[None].expand(2, -1)
        with counting(mlp=False) as calls:
            results[compile] = loss_and_grads(model, local, pos, local, tokens=ids.numel())
        results[f"{compile}_calls"] = calls
    assert_close(results[True], results[False])
    # Per layer: the ring forward posts cp−1 K/V hops, the backward cp−1 K/V and cp dK/dV;
    # Ulysses runs two all-to-all rounds forward and two backward. The compiled,
    # checkpointed blocks post no more (attention is never recomputed).
    want = {"p2p": 2 * (1 + 1 + 2), "all_to_all": 0} if method == "ring" else {"p2p": 0, "all_to_all": 2 * (2 + 2)}
    for kind, n in want.items():
        assert results["True_calls"][kind] == results["False_calls"][kind] == n, kind


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["ring", "ulysses"])
def test_compiled_blocks_under_context_parallel_attention_and_fsdp2(tmp_path, method):
    run_distributed(_cp2_worker, 2, str(tmp_path), method)


def test_config_key_compiles_every_block(compose_config):
    from longtrain.run_config import load_config
    from longtrain.parallel.mesh import ParallelDims

    for compile in (False, True):
        cfg = load_config(compose_config("preset=cpu_demo", f"model.compile={compile}"))
        model = build_model(cfg, VOCAB, ParallelDims(1, 1, 0, 1, torch.device("cpu")))
        assert [hasattr(b.forward, "_torchdynamo_orig_callable") for b in model.layers] == [compile] * cfg.model.n_layers


@pytest.mark.e2e
def test_readme_command_trains_and_gates_compiled(tmp_path):
    """README: python train.py preset=cpu_demo model.compile=true — the first stage, cut short:
    compiled training steps, then the gate's and validation's forwards at other shapes."""
    from tests.cli_utils import QUICK, train

    proc = train(*QUICK, "stage.steps=3", "gate.min_recall=0", "model.compile=true", f"run.dir={tmp_path}", cwd=tmp_path,
                 timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "induction" / "gate.json").exists()
