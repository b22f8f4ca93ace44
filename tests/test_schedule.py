import math

import pytest
import torch

from longtrain.optim.optimizer import build_optimizer, param_groups
from longtrain.optim.schedule import build_wsd_scheduler, wsd_lr_ratio
from longtrain.config import ModelConfig, OptimConfig, RopeConfig


def test_wsd_golden_value():
    # MiniCPM / Hägele et al.: N=1000, decay 20%, 1-sqrt; step 900 is half-way into the decay.
    assert wsd_lr_ratio(900, 1000, 10, 0.2, "1-sqrt") == pytest.approx(1 - math.sqrt(0.5), abs=1e-12)
    assert wsd_lr_ratio(900, 1000, 10, 0.2, "1-sqrt") == pytest.approx(0.2929, abs=1e-4)


@pytest.mark.parametrize(
    "shape,fn",
    [
        ("linear", lambda p: 1 - p),
        ("cosine", lambda p: 0.5 * (1 + math.cos(math.pi * p))),
        ("1-sqrt", lambda p: 1 - math.sqrt(p)),
    ],
)
def test_wsd_curve_point_by_point(shape, fn):
    total, warmup, frac, final = 100, 10, 0.3, 0.1
    expected = []
    for s in range(total):
        if s < warmup:
            expected.append((s + 1) / warmup)
        elif s < 70:
            expected.append(1.0)
        else:
            expected.append(final + (1 - final) * fn((s - 70) / 30))
    got = [wsd_lr_ratio(s, total, warmup, frac, shape, final) for s in range(total)]
    assert got == pytest.approx(expected, abs=1e-12)
    assert got[warmup - 1] == 1.0 and got[69] == 1.0 and got[70] == pytest.approx(1.0)


def test_scheduler_drives_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2.0)
    sched = build_wsd_scheduler(opt, 20, 5, 0.5, "linear", 0.0)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([2.0 * wsd_lr_ratio(s, 20, 5, 0.5, "linear", 0.0) for s in range(20)])


def test_no_weight_decay_on_norms_biases_embeddings():
    from longtrain.model.transformer import Transformer

    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=False), RopeConfig(), 40)
    model.extra = torch.nn.Linear(4, 4, bias=True)  # a bias, to check it is not decayed
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert "tok_embeddings.weight" in not_decayed and "extra.bias" in not_decayed
    assert all("norm" in n or "bias" in n or "embeddings" in n for n in not_decayed)
    assert "output.weight" in decayed and "layers.0.attention.wq.weight" in decayed
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    opt = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.1))
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[1]["weight_decay"] == 0.0
