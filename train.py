"""longtrain entry point: python train.py [overrides], or torchrun ... train.py [overrides].

All logic lives in longtrain/; this file turns a Hydra config into a validated one,
reports config errors as one line (before any compute, nothing written), and runs.
"""

import sys

import hydra
from omegaconf import DictConfig

from longtrain.config import ConfigError, load_config, validate
from longtrain.parallel.mesh import init_parallel, resolve_device, world_size_from_env


@hydra.main(config_path="configs", config_name="config", version_base=None)
def main(raw: DictConfig) -> None:
    try:
        cfg = load_config(raw)
        validate(cfg, world_size=world_size_from_env())
        device = resolve_device(cfg.run.device)
    except ConfigError as e:
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
