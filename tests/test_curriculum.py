"""Stage selection and refusal, the gate's pass / fail / extra-steps logic, stage RoPE."""

import json
from dataclasses import replace

import pytest
from hydra import initialize_config_dir

from longtrain.config import ConfigError, gate_tasks
from longtrain.curriculum import (
    Gate, StageError, compose_stage_configs, gate_failures, run_curriculum, starting_point, summary_table,
)
from longtrain.eval.grid import NeedleGrid
from longtrain.run_config import load_config
from longtrain.run_files import read_gate
from longtrain.trainer.builder import build_trainer
from tests.conftest import CONFIG_DIR
from tests.test_trainer import single_process

SMALL = [
    "preset=cpu_demo",
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "stage.steps=2", "stage.global_batch_size=2", "stage.micro_batch_size=2", "stage.warmup_steps=1",
    "data.max_docs=40", "logging.progress=false", "eval.val_every=0", "eval.val_batches=1",
    "gate.depths=[0.0,1.0]", "gate.trials=1", "gate.short_val_samples=2", "gate.max_extra_steps=0", "gate.min_cell_recall=0",
    "gate.report_tasks=[]", "rope.original_max_position_embeddings=256",
]


def stages(compose_config, tmp_path, *extra):
    """Two stages, 256 → 512 tokens: the CPU demo's first two stages made small."""
    out = []
    for name, seq_len in (("cpu/pretrain", 256), ("cpu/extend_2k", 512)):
        cfg = load_config(compose_config(*SMALL, f"stage={name}", f"run.dir={tmp_path}", *extra))
        out.append(replace(cfg, stage=replace(cfg.stage, seq_len=seq_len)))
    return out


def scripted_recall(monkeypatch, values):
    """Replace the needle grid by a scripted sequence of recalls (the gate logic under test)."""
    calls = iter(values)

    def fake(self, length):
        r = next(calls)
        return {"passkey": NeedleGrid("passkey", [length], [0.0], 1, [[r]])}

    monkeypatch.setattr(Gate, "grids", fake)


def grids(**rows: list[float]) -> dict[str, NeedleGrid]:
    return {task: NeedleGrid(task, [512], [i / (len(row) - 1) for i in range(len(row))], 10, [row]) for task, row in rows.items()}


def test_gate_thresholds(compose_config):
    cfg = load_config(compose_config("stage=pretrain", "gate.min_recall=0.9", "gate.max_short_loss_increase=0.1"))
    assert not gate_failures(grids(passkey=[0.9, 0.9]), 2.0, None, cfg)  # first stage: no short-loss reference
    assert gate_failures(grids(passkey=[0.9, 0.88]), 2.0, None, cfg) == ["recall 0.89 (need ≥ 0.9)"]
    # A recall that two decimals would round up to its threshold is shown with three.
    assert gate_failures(grids(passkey=[0.9, 0.89]), 2.0, None, cfg) == ["recall 0.895 (need ≥ 0.9)"]
    assert not gate_failures(grids(passkey=[0.95, 0.95]), 2.2, 2.0, cfg)  # exactly 1.1 × the reference
    assert gate_failures(grids(passkey=[0.95, 0.95]), 2.21, 2.0, cfg) == ["short loss 2.2100 (need ≤ 2.2000)"]


def test_gate_tasks_thresholds_and_reported_tasks(compose_config):
    cfg = load_config(compose_config(
        "stage=pretrain", "gate.min_recall=0.9", "gate.min_cell_recall=0.8", "+gate.tasks.vartrack=0.5",
        "gate.report_tasks=[multikey,vartrack]",
    ))
    assert gate_tasks(cfg) == {"passkey": 0.9, "vartrack": 0.5, "multikey": None}  # gated wins over reported
    # The reported task scores 0 and does not count; a needle cell under the floor fails a high mean.
    assert not gate_failures(grids(passkey=[1.0, 0.9, 0.8], vartrack=[0.0, 0.5, 1.0], multikey=[0, 0, 0]), 2.0, None, cfg)
    assert gate_failures(grids(passkey=[1.0, 1.0, 0.7], vartrack=[0.5, 0.5, 0.5], multikey=[0, 0, 0]), 2.0, None, cfg) == [
        "recall 0.70 at depth 100% (need ≥ 0.8 in every cell)"
    ]
    assert gate_failures(grids(passkey=[1.0, 1.0, 1.0], vartrack=[0.2, 0.4, 0.6], multikey=[0, 0, 0]), 2.0, None, cfg) == [
        "vartrack recall 0.40 (need ≥ 0.5)"
    ]


def test_command_line_stage_values_reach_every_stage():
    """`train.py stage=cpu/extend_2k stage.steps=3`: the stage list is read without them."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        configs = compose_stage_configs(["preset=cpu_demo", "stage=cpu/extend_2k", "stage.steps=3", "optim.lr=0.001"])
    assert [c.stage.name for c in configs] == ["induction", "pretrain", "extend_2k", "extend_8k"]
    assert [c.stage.seq_len for c in configs] == [64, 512, 2048, 8192]
    assert all(c.stage.steps == 3 and c.optim.lr == 0.001 for c in configs)


@pytest.mark.parametrize("chosen, read", [
    ("cpu/extend_8k", ["extend_2k", "extend_8k"]), ("cpu/induction", ["induction"]),
])
def test_a_command_that_chooses_a_stage_composes_it_and_the_stage_it_starts_from(chosen, read):
    """`train.py stage=...` runs that stage from the one before it; the stages it does not
    read are not composed; a stage outside the curriculum is one line before any is."""
    overrides = ["preset=cpu_demo", f"stage={chosen}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        configs = compose_stage_configs(overrides, only=chosen)
        with pytest.raises(ConfigError, match="^stage: 'cpu/extend_32k' is not in curriculum.stages; valid: cpu/induction, "):
            compose_stage_configs(overrides, only="cpu/extend_32k")
    assert [c.stage.name for c in configs] == read


def test_short_loss_uses_the_same_samples_in_every_stage(compose_config, tmp_path):
    """Stages differ in length and micro-batch; their short-loss checks must see the same tokens."""
    first, second = stages(compose_config, tmp_path, "gate.short_val_samples=6")
    second = replace(second, stage=replace(second.stage, micro_batch_size=1))
    a, b = build_trainer(first, single_process()), build_trainer(second, single_process())
    b.model.load_state_dict(a.model.state_dict())  # the same weights, at the same (pretraining) RoPE
    b.model.rotary = a.model.rotary
    assert Gate(a.evaluator, a.cfg).short_loss() == pytest.approx(Gate(b.evaluator, b.cfg).short_loss(), rel=1e-6)


def test_stage_rope_per_stage(compose_config):
    abf = [load_config(compose_config(f"stage={s}", "rope=abf")).rope for s in ("pretrain", "extend_32k", "extend_128k")]
    assert [r.theta for r in abf] == [10000.0, 500000.0, 5000000.0]
    yarn = [load_config(compose_config(f"stage={s}", "rope=yarn")).rope for s in ("pretrain", "extend_32k", "extend_128k")]
    assert [r.factor for r in yarn] == [1.0, 4.0, 16.0]
    assert {r.original_max_position_embeddings for r in yarn} == {8192}
    demo = load_config(compose_config("preset=cpu_demo", "stage=cpu/extend_8k", "rope=yarn")).rope
    assert demo.factor == 16.0 and demo.original_max_position_embeddings == 512
    shorter = load_config(compose_config("preset=cpu_demo", "stage=cpu/induction", "rope=yarn")).rope
    assert shorter.factor == 1.0  # a stage shorter than pretraining keeps plain RoPE


def test_entering_a_stage_needs_the_previous_gate(compose_config, tmp_path, monkeypatch):
    first, second = stages(compose_config, tmp_path)
    for entering in (second, replace(second, gate=replace(second.gate, force=True))):
        # Nothing to enter from, forced or not: the message points at stage.init_from.
        with pytest.raises(StageError, match=r"stage extend_2k: the stage before, pretrain, has no checkpoint .*stage.init_from"):
            starting_point(entering, first)
    scripted_recall(monkeypatch, [0.0])  # pretrain fails its gate
    with pytest.raises(StageError, match="failed its gate"):
        run_curriculum([first, second], single_process())
    assert read_gate(tmp_path / "pretrain").passed is False
    with pytest.raises(StageError, match=r"failed its gate \(recall 0.00\) in .*; train it further .* or set gate.force=true"):
        starting_point(second, first)
    forced = replace(second, gate=replace(second.gate, force=True))
    start, is_forced, _ = starting_point(forced, first)
    assert is_forced and start.name == "step_00000002"


def test_extra_steps_until_the_gate_passes(compose_config, tmp_path, monkeypatch):
    (first,) = stages(compose_config, tmp_path, "gate.max_extra_steps=4", "gate.extra_steps_increment=2")[:1]
    scripted_recall(monkeypatch, [0.5, 0.95])
    (record,) = run_curriculum([first], single_process())
    assert record.passed and record.extra_steps == 2 and record.step == 4 and record.recall == 0.95
    on_disk = read_gate(tmp_path / "pretrain")
    assert on_disk.passed and on_disk.checkpoint.endswith("step_00000004")


def test_failing_after_all_extra_steps_stops(compose_config, tmp_path, monkeypatch):
    (first,) = stages(compose_config, tmp_path, "gate.max_extra_steps=4", "gate.extra_steps_increment=2")[:1]
    scripted_recall(monkeypatch, [0.1, 0.2, 0.3])
    with pytest.raises(StageError, match="failed its gate after 4 extra steps: recall 0.30"):
        run_curriculum([first], single_process())
    assert read_gate(tmp_path / "pretrain").extra_steps == 4


def test_curriculum_hands_over_and_skips_passed_stages(compose_config, tmp_path, monkeypatch):
    first, second = stages(compose_config, tmp_path, "gate.min_recall=0.0", "gate.report_tasks=[multikey]",
                           "gate.report_trials=2")
    records = run_curriculum([first, second], single_process())  # the real needle grid
    assert [r.stage for r in records] == ["pretrain", "extend_2k"] and all(r.passed for r in records)
    gate2 = read_gate(tmp_path / "extend_2k")
    assert gate2.reference_short_loss == records[0].short_loss
    assert gate2.recall_before is not None  # the starting checkpoint, evaluated at 512
    before = json.loads((tmp_path / "extend_2k" / "recall_before.json").read_text())
    assert before["checkpoint"] == records[0].checkpoint
    # Every task's grid after and before, once each.
    assert sorted(p.name for p in (tmp_path / "extend_2k" / "needle").glob("*.json")) == ["multikey.json", "passkey.json"]
    for name in ("needle/passkey", "needle/multikey", "needle_before/passkey", "needle_before/multikey"):
        assert json.loads((tmp_path / "extend_2k" / f"{name}.json").read_text())["lengths"] == [512]
    grid = {n: json.loads((tmp_path / "extend_2k" / f"needle/{n}.json").read_text()) for n in ("passkey", "multikey")}
    assert grid["passkey"]["trials"] == 1 and grid["multikey"]["trials"] == 2  # gate.trials, gate.report_trials
    multikey = gate2.tasks["multikey"]
    assert multikey["min_recall"] is None and multikey["recall_before"] is not None and 0 <= multikey["recall"] <= 1
    assert gate2.tasks["passkey"]["recall"] == gate2.recall and gate2.tasks["passkey"]["min_recall"] == 0.0
    logged = [json.loads(line) for line in (tmp_path / "extend_2k" / "metrics.jsonl").read_text().splitlines()]
    gate_row = next(r for r in logged if "gate/recall" in r)
    assert gate_row["gate/multikey/recall"] == multikey["recall"] and "gate/multikey/recall_before" in gate_row
    by_position = json.loads((tmp_path / "extend_2k" / "position_loss.json").read_text())
    assert by_position["seq_len"] == second.stage.seq_len and len(by_position["loss"]) == second.eval.position_buckets
    # Run again: both gates passed, nothing retrains.
    monkeypatch.setattr(Gate, "grids", lambda self, length: pytest.fail("a passed stage was re-run"))
    again = run_curriculum([first, second], single_process())
    assert [r.step for r in again] == [r.step for r in records]
    table = summary_table(again).splitlines()
    assert len(table) == 4 and table[2].split()[:3] == ["pretrain", "256", "-"]  # no recall before pretraining
    assert table[3].split()[:3] == ["extend_2k", "512", f"{records[1].recall_before:.2f}"]
    assert "multikey" in table[0] and f"{multikey['recall_before']:.2f} → {multikey['recall']:.2f}" in table[3]
