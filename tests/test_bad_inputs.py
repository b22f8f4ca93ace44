"""Every bad input is one line naming the key, exit code 2, no traceback, nothing written.

Each case runs train.py's ``main(argv)`` in this process, in a fresh folder; two of them
also run as ``python train.py ...`` processes (the e2e tier), to show that what a user
sees is that one line and nothing more (no warning, no traceback) with the same code.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from tests.cli_utils import QUICK, train, train_in_process

DEMO = ["preset=cpu_demo", "stage=cpu/induction", "stage.steps=1"]

# (case id, overrides, the key the error line must start with). "{fx}" is the fixtures folder.
CASES = [
    ("heads-not-divisible", ["model.n_heads=6"], "model.n_heads"),
    ("odd-head-dim", ["model.head_dim=33"], "model.head_dim"),
    ("vocab-smaller-than-tokenizer", [*DEMO, "model.vocab_size=10"], "model.vocab_size"),
    ("wrong-type", ["model.dim=abc"], "model.dim"),
    ("unknown-nested-key", ["model.foo=1"], "model.foo"),
    ("unknown-model", ["model=nope"], "model"),
    ("unknown-stage", ["stage=nope"], "stage"),
    ("unknown-preset", ["preset=nope"], "preset"),
    ("unknown-rope-option", ["rope=nope"], "rope"),
    ("unknown-key", ["foo=1"], "foo"),
    ("appended-unknown-key", ["+foo=1"], "foo"),
    ("append-existing-key", ["+model.dim=3"], "model.dim"),
    ("override-without-value", ["foo"], "foo"),
    ("unparsable-override", ["optim.lr=["], "optim.lr=["),
    ("sweep-without-multirun", ["optim.lr=1e-3,3e-3"], "optim.lr"),
    ("negative-lr", ["optim.lr=-0.1"], "optim.lr"),
    ("lr-not-a-number", ["optim.lr=abc"], "optim.lr"),
    ("zero-global-batch", ["stage.global_batch_size=0"], "stage.global_batch_size"),
    ("global-batch-not-multiple", ["stage.global_batch_size=7"], "stage.global_batch_size"),
    ("zero-seq-len", ["stage.seq_len=0"], "stage.seq_len"),
    ("decay-shape", ["stage.decay_shape=exp"], "stage.decay_shape"),
    ("retrieval-share-above-one", ["stage.retrieval_share=1.5"], "stage.retrieval_share"),
    ("zero-original-length", ["rope.original_max_position_embeddings=0"], "rope.original_max_position_embeddings"),
    ("abf-theta-zero", ["rope=abf", "stage.abf_theta=0"], "stage.abf_theta"),
    ("rope-type", ["rope.type=ntk"], "rope.type"),
    ("yarn-betas", ["rope=yarn", "rope.beta_fast=0.5"], "rope.beta_fast"),
    ("seq-len-not-divisible-by-2cp", ["parallel.cp=3"], "stage.seq_len"),
    ("world-size-mismatch", ["parallel.dp=2"], "parallel"),
    ("zero-timeout", ["parallel.timeout_s=0"], "parallel.timeout_s"),
    ("cp-load-balancer", ["parallel.cp_load_balancer=heads"], "parallel.cp_load_balancer"),
    ("nonfinite-patience", ["optim.max_nonfinite_steps=0"], "optim.max_nonfinite_steps"),
    ("resume-missing-folder", ["run.resume=/no/such/checkpoint"], "run.resume"),
    ("resume-not-a-checkpoint", [*DEMO, "run.resume={fx}/not_a_checkpoint"], "run.resume"),
    ("resume-damaged-checkpoint", [*DEMO, "run.resume={fx}/damaged/step_00000002"], "run.resume"),
    ("run-dir-is-a-file", ["run.dir={fx}/a_file"], "run.dir"),
    ("overwrite-while-resuming", ["run.resume=auto", "run.overwrite=true"], "run.overwrite"),
    ("hf-tokenizer-without-path", ["tokenizer=hf"], "tokenizer.path"),
    ("hf-tokenizer-not-a-tokenizer", [*DEMO, "tokenizer=hf", "tokenizer.path={fx}/not_a_checkpoint"], "tokenizer.path"),
    ("local-data-without-path", ["data=local"], "data.path"),
    ("local-data-no-match", ["data=local", "data.path={fx}/none/*.txt"], "data.path"),
    ("empty-data-file", [*DEMO, "data=local", "data.path={fx}/empty.txt"], "data.path"),
    ("binary-data-file", [*DEMO, "data=local", "data.path={fx}/binary.txt"], "data.path"),
    ("corrupt-jsonl", [*DEMO, "data=local", "data.path={fx}/corrupt.jsonl"], "data.path"),
    ("jsonl-without-text-field", [*DEMO, "data=local", "data.path={fx}/nofield.jsonl"], "data.path"),
    ("corpus-too-small", [*DEMO, "data=local", "data.path={fx}/tiny.txt"], "data.val_percent"),
    ("val-percent-zero", ["data.val_percent=0"], "data.val_percent"),
    ("gate-kind", ["gate.kind=riddle"], "gate.kind"),
    ("retrieval-kind", ["retrieval.kinds=[passkey,riddle]"], "retrieval.kinds"),
    ("min-recall-above-one", ["gate.min_recall=2"], "gate.min_recall"),
    ("gate-task-name", ["+gate.tasks.riddle=0.5"], "gate.tasks.riddle"),
    ("gate-task-threshold", ["+gate.tasks.vartrack=1.5"], "gate.tasks.vartrack"),
    ("gate-task-without-plus", ["gate.tasks.vartrack=0.5"], "gate.tasks.vartrack"),
    ("gate-report-task", ["gate.report_tasks=[multikey,riddle]"], "gate.report_tasks"),
    ("gate-cell-floor", ["gate.min_cell_recall=1.5"], "gate.min_cell_recall"),
    ("gate-report-trials", ["gate.report_trials=-1"], "gate.report_trials"),
    ("gate-task-too-long-for-stage", ["preset=cpu_demo", "+gate.tasks.vartrack=0.5"], "gate.tasks.vartrack"),
    ("device", ["run.device=tpu"], "run.device"),
    ("log-every-zero", ["logging.log_every=0"], "logging.log_every"),
    ("stage-not-in-curriculum", ["stage=cpu/extend_2k"], "stage"),
    ("empty-curriculum", ["curriculum.stages=[]"], "curriculum.stages"),
    ("occupied-run-folder", [*QUICK, "run.dir={fx}/occupied"], "run.dir"),
]


def make_fixtures(fx: Path) -> None:
    fx.mkdir()
    (fx / "a_file").write_text("not a folder")
    (fx / "not_a_checkpoint").mkdir()
    (fx / "not_a_checkpoint" / "notes.txt").write_text("hello")
    damaged = fx / "damaged" / "step_00000002"
    damaged.mkdir(parents=True)
    (damaged / "__0_0.distcp").write_bytes(b"x" * 100)  # checksums say 4096 bytes were written
    (damaged / "checksums.json").write_text(
        json.dumps({"run_id": "r", "step": 2, "files": {"__0_0.distcp": {"size": 4096, "sha256": "0" * 64}}})
    )
    (fx / "empty.txt").write_text("")
    (fx / "binary.txt").write_bytes(bytes(range(128, 256)) * 20)
    (fx / "corrupt.jsonl").write_text('{"text": broken\n')
    (fx / "nofield.jsonl").write_text('{"body": "no text field"}\n')
    (fx / "tiny.txt").write_text("hello world\n")
    occupied = fx / "occupied" / "induction" / "checkpoints" / "step_00000004"
    occupied.mkdir(parents=True)
    (fx / "occupied" / "induction" / "metrics.jsonl").write_text('{"step": 4}\n')


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in folder.rglob("*")}


Runner = Callable[..., subprocess.CompletedProcess]


def run_cases(base: Path, cases: list, runner: Runner) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Each case in its own empty folder under ``base``; the fixtures must stay untouched."""
    fx = base / "fixtures"
    make_fixtures(fx)
    before = snapshot(fx)
    results = {}
    for name, overrides, _ in cases:
        cwd = base / name
        cwd.mkdir()
        args = [o.replace("{fx}", str(fx)) for o in overrides]
        if not any(a.startswith("run.dir=") for a in args):
            args.append(f"run.dir={cwd / 'run'}")
        results[name] = runner(*args, cwd=cwd), cwd
    assert snapshot(fx) == before, "a bad input changed the fixtures (an occupied run folder, a checkpoint)"
    return results


def assert_one_line(proc: subprocess.CompletedProcess, cwd: Path, key: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"config error: {key}:"), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert list(cwd.iterdir()) == []  # no run folder, no Hydra outputs


def test_the_battery_is_large():
    assert len({name for name, _, _ in CASES}) == len(CASES) >= 40


# One case per test (not one fixture running them all): the cases spread over the workers.
@pytest.mark.parametrize("name,overrides,key", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(tmp_path, name, overrides, key):
    proc, cwd = run_cases(tmp_path, [(name, overrides, key)], train_in_process)[name]
    assert_one_line(proc, cwd, key)


# A Hydra error (before longtrain's code runs) and a check that reads files (after it has
# imported torch and the tokenizer), each as the one line a user's process prints.
AS_A_PROCESS = [c for c in CASES if c[0] in ("unknown-nested-key", "resume-damaged-checkpoint")]


@pytest.mark.e2e
@pytest.mark.parametrize("name,overrides,key", AS_A_PROCESS, ids=[c[0] for c in AS_A_PROCESS])
def test_bad_input_is_one_line_as_a_process(tmp_path, name, overrides, key):
    proc, cwd = run_cases(tmp_path, [(name, overrides, key)], train)[name]
    assert_one_line(proc, cwd, key)
