import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before datasets is imported

import torch
from hydra import compose, initialize_config_dir

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core: a worker's torch using every core as well would
    # oversubscribe the machine (each spawned rank sets its own threads in tests/dist_utils.py).
    torch.set_num_threads(1)

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


@pytest.fixture
def compose_config():
    """Compose the real Hydra config tree with overrides, as train.py would."""

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            return compose(config_name="config", overrides=list(overrides))

    return _compose
