"""The README and docs/ cannot drift from the code.

- Every command line in a fenced ```bash block of README.md and docs/*.md is covered:
  either validated here (``python train.py ...`` / ``torchrun ... train.py ...`` as a dry
  run at its world size, ``python -m longtrain.plan ...`` run in-process), or run by the
  test that COVERED names (which must exist). A command with no coverage fails with its
  text: add it to COVERED with the test that runs it, or take it out of the docs.
- Every ``$ command`` shown with its output in a plain ``` block gives that output.
- Every relative link (and its #anchor) between the pages resolves.
- docs/architecture.md is what ``python docs/architecture.py`` generates now.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

from longtrain.cli import main as train_main
from longtrain.plan import main as plan_main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)

# Commands that need a trained run, a checkpoint, a folder, a cluster or minutes, mapped
# to the test that runs them (at a smaller size where the command is a benchmark or a
# whole curriculum). ".ci/run" means CI runs it on a fresh machine.
COVERED = {
    "pip install torch==2.13.0": ".ci/run",
    'pip install -e ".[dev]"': ".ci/run",
    'pip install -e ".[dev,sweep]"': ".ci/run",
    "python -m pytest -q": ".ci/run",
    'python -m pytest -m "not e2e"': ".ci/run",
    "python train.py --cfg job": "tests/test_config.py::test_cli_prints_resolved_config",
    "python -m bench.cp_comm": "tests/test_cp_comm.py::test_counted_bytes_equal_the_planner",
    "python -m bench.cp_balance": "tests/test_balanced_ring.py::test_bench_command_runs",
    "python -m bench.cp_balance --step": "tests/test_balanced_ring.py::test_bench_command_runs",
    "python -m bench.gpu --out OUT --results bench/RESULTS.md": "tests/test_bench_gpu.py::test_without_cuda_it_stops_in_one_line",
    "python -m longtrain.data.prepare data=stdlib_code tokenizer=byte out=data/stdlib":
        "tests/test_prepare.py::test_data_readme_commands",
    "python train.py preset=cpu_demo stage=cpu/extend_2k stage.init_from=hf:PATH":
        "tests/test_hf.py::test_import_equals_transformers_then_trains",
    "python train.py preset=cpu_demo stage=cpu/extend_2k model=hf model.hf_path=PATH stage.init_from=hf:PATH "
    "tokenizer=hf tokenizer.path=PATH": "tests/test_hf.py::test_readme_extend_command_validates_every_stage",
    "python -m longtrain.export runs/cpu_demo/extend_8k/checkpoints/step_00000150 exports/extend_8k --check":
        "tests/test_hf.py::test_export_check_generate_decodes_what_our_evaluator_does",
    "python -m longtrain.eval.needle hf:exports/extend_8k":
        "tests/test_hf.py::test_needle_cli_on_export_gives_the_checkpoint_grid",
    "python -m longtrain.eval.needle runs/cpu_demo/pretrain/checkpoints/step_00000450 --lengths 512 2048":
        "tests/test_needle.py::test_cli_rebuilds_model_from_checkpoint",
    "python -m longtrain.eval.position_loss runs/cpu_demo/extend_8k/checkpoints/step_00000150":
        "tests/test_needle.py::test_position_loss_uses_single_document_windows",
    "python -m longtrain.eval.suite runs/cpu_demo/extend_2k/checkpoints/step_00000250 --lengths 512 2048 "
    "--tasks passkey multikey vartrack": "tests/test_tasks.py::test_suite_table_json_plot_and_cli",
    "python -m longtrain.reporting runs/cpu_demo": "tests/test_report.py::test_a_finished_run_has_its_report",
    "python -m longtrain.reporting RUN_DIR": "tests/test_report.py::test_a_finished_run_has_its_report",
    "python -m longtrain.reporting RUN_DIR --out DIR": "tests/test_report.py::test_a_finished_run_has_its_report",
    "python -m longtrain.reporting SWEEP_DIR": "tests/test_sweeps.py::test_seeds_sweep_adds_mean_and_spread_per_recipe",
    "python -m longtrain.reporting.sweep_report SWEEP_DIR":
        "tests/test_sweeps.py::test_rope_method_sweep_one_job_per_method_and_a_failed_gate_is_a_row",
    "python train.py -m optim.lr=1e-3,3e-3":
        "tests/test_run_safety.py::test_sweep_jobs_get_their_own_folders_and_a_failed_gate_does_not_stop_the_sweep",
    "python train.py -m +sweep=rope_method preset=cpu_demo": "tests/test_sweeps.py::test_readme_sweep_commands_validate",
    "python train.py -m +sweep=seeds preset=cpu_demo rope=abf,yarn":
        "tests/test_sweeps.py::test_readme_sweep_commands_validate",
    "python train.py -m +sweep=abf_base preset=cpu_demo stage=cpu/extend_2k stage.init_from=CKPT":
        "tests/test_sweeps.py::test_readme_sweep_commands_validate",
    "python train.py -m +sweep=extension_lr preset=cpu_demo stage=cpu/extend_2k stage.init_from=CKPT":
        "tests/test_sweeps.py::test_readme_sweep_commands_validate",
    "python train.py -m +sweep=data_mix preset=cpu_demo stage=cpu/extend_2k stage.init_from=CKPT":
        "tests/test_sweeps.py::test_readme_sweep_commands_validate",
    "python train.py -m +sweep=search_lr_retrieval preset=cpu_demo stage=cpu/extend_2k stage.init_from=CKPT "
    "hydra.sweeper.n_trials=12 hydra/launcher=submitit_local":
        "tests/test_sweeps.py::test_optuna_search_runs_trials_through_submitit_local_and_prints_the_best",
    "python train.py -m hydra/launcher=slurm hydra.launcher.nodes=2 hydra.launcher.partition=gpu +sweep=rope_method "
    "stage=extend_32k stage.init_from=CKPT parallel.cp=16 run.dir=/shared/sweeps/rope":
        "tests/test_sweeps.py::test_slurm_launcher_takes_nodes_gpus_time_and_partition_from_config",
    "sbatch --nodes=2 launch/slurm.sbatch parallel.dp=2 parallel.cp=8":
        "tests/test_run_safety.py::test_slurm_script_forwards_the_stop_signal_and_requeues",
    "python -m bench.throughput --seq-lens 2048 8192 --vocabs 259 32000 --impls hf none selective full_tiled "
    "--steps 2 --threads 1": "tests/test_bench_memory.py::test_throughput_command_runs_per_vocabulary",
    "python -m bench.throughput --seq-lens 2048 8192 --vocabs 259 32000 --impls hf hf_compiled none compiled "
    "--steps 7 --threads 1": "tests/test_bench_memory.py::test_throughput_command_runs_compiled_with_stub_attention",
    "python -m bench.throughput --seq-lens 2048 8192 32768 --vocabs 259 --impls hf hf_compiled none compiled "
    "--steps 7 --threads 1 --attention stub":
        "tests/test_bench_memory.py::test_throughput_command_runs_compiled_with_stub_attention",
    "python -m bench.memory longest --cap-gb 0.5 --granule 2048 --impls hf none selective full_tiled --doc-len 2048":
        "tests/test_bench_memory.py::test_longest_bisects_to_the_last_length_that_fits",
    "python -m bench.memory scaling --impls full_tiled --seq-lens 8192 16384 32768 65536 131072 --doc-len 2048":
        "tests/test_bench_memory.py::test_memory_scaling_command_runs",
}

# `$ command` examples whose output needs hardware the tests do not have, or that another test
# compares with what the command prints.
COVERED_EXAMPLES = {
    "python train.py model.head_dim=100":
        "tests/test_hardware.py::test_cli_precondition_failure_exits_2_before_any_compute",
    "python -m longtrain.plan stage=extend_128k --suggest --nodes 1":
        "tests/test_plan_comm.py::test_suggest_on_three_cluster_shapes_picks_a_valid_method_and_is_what_the_docs_show",
    "python -m longtrain.plan stage=extend_128k --suggest --nodes 4":
        "tests/test_plan_comm.py::test_suggest_on_three_cluster_shapes_picks_a_valid_method_and_is_what_the_docs_show",
    "python -m longtrain.plan stage=extend_128k --suggest --nodes 32":
        "tests/test_plan_comm.py::test_suggest_on_three_cluster_shapes_picks_a_valid_method_and_is_what_the_docs_show",
}


def bash_commands(text: str) -> list[str]:
    """Command lines of the ```bash blocks: continuations joined, comments dropped, `&&` split."""
    commands = []
    for lang, body in FENCE.findall(text):
        if lang != "bash":
            continue
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands += [" ".join(part.split()) for part in line.split(" && ")]
    return commands


def examples(text: str) -> list[tuple[str, list[str]]]:
    """`$ command` lines of plain ``` blocks with the output lines shown after each."""
    shown = []
    for lang, body in FENCE.findall(text):
        if lang:
            continue
        current = None
        for line in body.splitlines():
            if line.startswith("$ "):
                current = (" ".join(line[2:].split()), [])
                shown.append(current)
            elif current is not None and line.strip():
                current[1].append(line)
    return shown


def all_commands() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for page in PAGES:
        for command in bash_commands(page.read_text()):
            found.setdefault(command, []).append(str(page.relative_to(ROOT)))
    return found


def all_examples() -> dict[str, list[str]]:
    return {command: output for page in PAGES for command, output in examples(page.read_text())}


PLACEHOLDER = re.compile(r"(^|[=:/\s])(PATH|CKPT|CHECKPOINT|RUN_DIR|SWEEP_DIR|DIR|OUT|RUN)(\b|$)")


def dry_runnable(command: str) -> tuple[int, list[str]] | None:
    """(world size, train.py arguments) of a single run that a dry run validates, else None."""
    words = shlex.split(command)
    if words[:2] == ["python", "train.py"]:
        world, args = 1, words[2:]
    elif words[:1] == ["torchrun"] and "train.py" in words:
        at = words.index("train.py")
        (nproc,) = [w.split("=", 1)[1] for w in words[1:at] if w.startswith("--nproc_per_node=")]
        world, args = int(nproc), words[at + 1:]
    else:
        return None
    if any(a.startswith("-") for a in args) or PLACEHOLDER.search(command):
        return None  # -m, --cfg: a sweep or a printout; a placeholder: needs a real folder
    return world, args


def plan_args(command: str) -> list[str] | None:
    words = shlex.split(command)
    return words[3:] if words[:3] == ["python", "-m", "longtrain.plan"] else None


def covering_test_exists(target: str) -> bool:
    if target == ".ci/run":
        return (ROOT / ".ci" / "run").is_file() and "pytest" in (ROOT / ".ci" / "run").read_text()
    path, _, name = target.partition("::")
    file = ROOT / path
    return file.is_file() and re.search(rf"^(async )?def {re.escape(name)}\(", file.read_text(), re.MULTILINE) is not None


def _params(commands):
    return [pytest.param(c, id=c) for c in commands]


def run_train(args: list[str], world: int, cwd: Path, monkeypatch, capsys) -> tuple[int, str, str]:
    """train.py's ``main(argv)`` on ``args`` in this process, at world size ``world``."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.chdir(cwd)
    code = train_main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


COMMANDS = all_commands()
DRY = {c: dry_runnable(c) for c in COMMANDS if dry_runnable(c) is not None}
PLANS = {c: plan_args(c) for c in COMMANDS if plan_args(c) is not None}
EXAMPLES = all_examples()


def test_every_command_in_the_docs_is_covered():
    missing = [f"{c}   ({', '.join(COMMANDS[c])})" for c in COMMANDS if c not in DRY and c not in PLANS and c not in COVERED]
    assert not missing, "commands in the docs that no test runs or validates (add them to COVERED in " \
                        "tests/test_docs.py with the test that runs them, or take them out):\n" + "\n".join(missing)
    gone = [f"{c} -> {t}" for c, t in {**COVERED, **COVERED_EXAMPLES}.items() if not covering_test_exists(t)]
    assert not gone, "COVERED names tests that do not exist:\n" + "\n".join(gone)
    stale = [c for c in COVERED if c not in COMMANDS] + [c for c in COVERED_EXAMPLES if c not in EXAMPLES]
    assert not stale, "COVERED lists commands the docs no longer show:\n" + "\n".join(stale)


def test_the_readme_keeps_the_ci_test_command():
    readme = (ROOT / "README.md").read_text()
    assert 'pip install torch==2.13.0 && pip install -e ".[dev,sweep]" && python -m pytest -q' in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q torch==2.13.0" in ci and '-e ".[dev,sweep]"' in ci and "python3 -m pytest -q" in ci


@pytest.mark.e2e  # the README's and docs' commands, each a whole command-line composition
@pytest.mark.parametrize("command", _params(DRY))
def test_train_command_validates(command, tmp_path, monkeypatch, capsys):
    """A dry run at the command's world size: every stage validated, the plan printed, nothing written."""
    world, args = DRY[command]
    code, out, err = run_train([*args, "run.dry_run=true", f"run.dir={tmp_path / 'run'}"], world, tmp_path,
                               monkeypatch, capsys)
    assert code == 0, err
    assert "nothing written" in out and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", _params(PLANS))
def test_plan_command_runs(command, capsys):
    assert plan_main(PLANS[command]) == 0
    out = capsys.readouterr().out
    assert "predicted peak per rank" in out
    if "--suggest" in PLANS[command]:
        assert "suggest: parallel.cp=" in out


@pytest.mark.parametrize("command", _params([c for c in EXAMPLES if c not in COVERED_EXAMPLES]))
def test_shown_output_is_what_the_command_prints(command, tmp_path, monkeypatch, capsys):
    """`$ python train.py ...` with the error line the docs show: that line, exit code 2, nothing written."""
    words = shlex.split(command)
    assert words[:2] == ["python", "train.py"], f"no way to check a shown command that is not train.py: {command}"
    code, out, err = run_train([*words[2:], f"run.dir={tmp_path / 'run'}"], 1, tmp_path, monkeypatch, capsys)
    assert (code, out) == (2, "")
    assert [line for line in err.splitlines() if line.strip()] == EXAMPLES[command]
    assert list(tmp_path.iterdir()) == []


LINK = re.compile(r"(?<!\\)\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown page."""
    text = FENCE.sub("", page.read_text())
    slugs = set()
    for heading in re.findall(r"^#{1,6}\s+(.*)$", text, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        slugs.add(slug)
    return slugs


def test_every_relative_link_resolves():
    broken = []
    for page in [*PAGES, ROOT / "bench" / "RESULTS.md", ROOT / "data" / "README.md"]:
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not ours to check
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


def load_architecture():
    spec = importlib.util.spec_from_file_location("docs_architecture", ROOT / "docs" / "architecture.py")
    architecture = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = architecture  # its dataclasses look their module up there
    spec.loader.exec_module(architecture)
    return architecture


def test_architecture_page_is_generated_from_the_code_now():
    assert (ROOT / "docs" / "architecture.md").read_text() == load_architecture().generate(), \
        "docs/architecture.md is stale: run python docs/architecture.py"


def test_architecture_finds_imports_in_functions_relative_imports_and_cycles(tmp_path):
    """The generator on a made-up package: what a module imports however it is written."""
    files = {
        "train.py": "from longtrain.cli import main\n",
        "longtrain/__init__.py": "",
        "longtrain/config.py": "import os\n",
        "longtrain/cli.py": "from . import config\ndef main():\n    from longtrain.report import tables\n",
        "longtrain/report/__init__.py": "from .tables import table\n",
        "longtrain/report/tables.py": "from ..config import X\nimport longtrain.report.run as run\n",
        "longtrain/report/run.py": "def f():\n    from longtrain.report.tables import table\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    modules, level, cycles = load_architecture().analyse(tmp_path)
    assert modules["longtrain.cli"].top == {"longtrain.config"}
    assert modules["longtrain.cli"].inner == {"longtrain.report.tables"}
    assert modules["longtrain.report"].top == {"longtrain.report.tables"}
    assert modules["longtrain.report.tables"].top == {"longtrain.config", "longtrain.report.run"}
    assert modules["longtrain.report.run"].inner == {"longtrain.report.tables"}
    assert cycles == [["longtrain.report.run", "longtrain.report.tables"]]
    assert (level["longtrain.config"], level["longtrain.report.tables"], level["longtrain.report.run"]) == (0, 1, 1)
    assert level["longtrain.cli"] == 2 and level["train"] == 3
