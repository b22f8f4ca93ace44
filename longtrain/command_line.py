"""Hydra around longtrain's commands: the config folder, Hydra's errors as one line, the
folders of a multirun's jobs, a SLURM task's torchrun variables.

Hydra reports its own errors (an unknown key, a missing group option, a sweep value
without ``-m``) as several lines of text with exit code 1; :func:`hydra_error_line` turns
them into the project's one line (``config error: KEY: what is wrong; valid: ...``, exit
2). The checks before any compute are longtrain/preflight.py's.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

from longtrain.config import Config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

# Hydra plugins (and the packages they import) that the optional extra "sweep" installs.
SWEEP_EXTRA_OPTIONS = {"hydra/sweeper": ("optuna",), "hydra/launcher": ("submitit_local", "submitit_slurm")}
SWEEP_EXTRA_MODULES = ("optuna", "submitit")
SWEEP_EXTRA_HINT = 'needs the optional extra "sweep": pip install -e ".[sweep]"'


def group_options(group: str) -> list[str]:
    """Every option of a config group, nested ones included (``cpu/pretrain``)."""
    root = CONFIG_DIR / group
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def hydra_error_line(error: Exception) -> Optional[str]:
    """Hydra's multi-line composition and parse errors as one ``KEY: message`` line."""
    text = str(error)
    missing = _missing_module(error)
    if missing in SWEEP_EXTRA_MODULES:
        return f"{missing}: not installed; the sweeper or launcher chosen {SWEEP_EXTRA_HINT}"
    if isinstance(error, MissingConfigException) and error.missing_cfg_file:
        group, _, option = error.missing_cfg_file.rpartition("/")
        if option in SWEEP_EXTRA_OPTIONS.get(group, ()):
            return f"{group}: {option} {SWEEP_EXTRA_HINT}"
        valid = group_options(group) if (CONFIG_DIR / group).is_dir() else list(error.options or [])
        return f"{group}: unknown option {option!r}; valid: {', '.join(valid)}"
    if isinstance(error, OverrideParseException):
        return f"{error.override}: not a valid override (KEY=VALUE, e.g. optim.lr=1e-3): {text.splitlines()[-2].strip()}"
    if isinstance(error, ConfigCompositionException):
        if m := re.match(r"Could not override '([^']+)'", text):
            return _unknown_key(m.group(1))
        if m := re.match(r"Ambiguous value for argument '([^=]+)=([^']*)'", text):
            return (f"{m.group(1)}: {m.group(2)!r} is a sweep (several values); add -m to run one job per value, "
                    f"or write a list as [{m.group(2)}]")
        if m := re.match(r"Could not append to config. An item is already at '([^']+)'", text):
            return f"{m.group(1)}: already set; override it without the leading +"
        return f"config: {text.splitlines()[0]}"
    return None


def _missing_module(error: BaseException) -> Optional[str]:
    """The top-level package a ModuleNotFoundError names, also when Hydra wrapped it."""
    seen: Optional[BaseException] = error
    while seen is not None:
        if isinstance(seen, ModuleNotFoundError) and seen.name:
            return seen.name.split(".")[0]
        seen = seen.__cause__ or seen.__context__
    return None


def torchrun_env_from_submitit() -> None:
    """A sweep job that hydra/launcher=slurm started runs one task per GPU on each node;
    give every task the variables torchrun would (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT), so the job is one torch distributed world like a torchrun job."""
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "RANK" not in os.environ:
        from submitit.helpers import TorchDistributedEnvironment  # the optional extra "sweep"

        # Every task keeps every GPU in sight and takes cuda:LOCAL_RANK, as under torchrun.
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def _unknown_key(key: str) -> str:
    parent, _, name = key.rpartition(".")
    node: object = Config
    for part in parent.split(".") if parent else []:
        fields = getattr(node, "__dataclass_fields__", {})
        if part not in fields:
            return f"{key}: unknown key; valid top-level keys: {', '.join(Config.__dataclass_fields__)}"
        node = fields[part].default_factory()  # type: ignore[misc]
    if isinstance(node, dict):  # a mapping (gate.tasks): Hydra adds new entries only with +
        return f"{key}: not in {parent}; add it with +{key}=VALUE"
    valid = ", ".join(getattr(node, "__dataclass_fields__", {}))
    return f"{key}: unknown key; valid: {valid}"


def sweep_root(task_overrides: list[str], sweep_dir: str) -> str:
    """The folder holding a multirun's job folders: the ``run.dir`` given on the command
    line (jobs go to run.dir/<job>), else Hydra's sweep folder (multirun/<date>/<job>)."""
    given = [o.split("=", 1)[1] for o in task_overrides if o.lstrip("+").startswith("run.dir=")]
    return given[-1] if given else sweep_dir
