"""longtrain entry point: python train.py [overrides], or torchrun ... train.py [overrides].

All logic lives in longtrain/; this file turns a Hydra config into a validated one,
reports config errors as one line (before any compute, nothing written), and runs.
"""

import os
import sys

# Everything runs offline: datasets/transformers must never try the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from longtrain.config import ConfigError, load_config, validate  # noqa: E402
from longtrain.parallel.mesh import init_parallel, resolve_device, world_size_from_env  # noqa: E402


@hydra.main(config_path="configs", config_name="config", version_base=None)
def main(raw: DictConfig) -> None:
    try:
        cfg = load_config(raw)
        validate(cfg, world_size=world_size_from_env())
        device = resolve_device(cfg.run.device)
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":  # every rank fails the same way; one line is enough
            print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)

    import torch  # after validation: a bad config should not pay for importing torch's world

    from longtrain.trainer import run_stage

    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    pd = init_parallel(cfg.parallel, device)
    run_stage(cfg, pd)


if __name__ == "__main__":
    main()
