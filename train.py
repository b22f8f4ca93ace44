"""longtrain entry point: python train.py [overrides], or torchrun ... train.py [overrides].

All logic lives in longtrain/; this file turns Hydra's config into one validated config
per curriculum stage, reports config errors as one line (before any compute, nothing
written), and runs the whole curriculum, or the one stage named by `stage=...`.
"""

import os
import sys

# Everything runs offline: datasets/transformers must never try the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from longtrain.config import ConfigError, validate  # noqa: E402
from longtrain.parallel.mesh import init_parallel, resolve_device, world_size_from_env  # noqa: E402


def fail(kind: str, message: str, code: int) -> None:
    if os.environ.get("RANK", "0") == "0":  # every rank fails the same way; one line is enough
        print(f"{kind}: {message}", file=sys.stderr)
    sys.exit(code)


@hydra.main(config_path="configs", config_name="config", version_base=None)
def main(raw: DictConfig) -> None:
    from longtrain.curriculum import StageError, compose_stage_configs, run_curriculum, summary_table

    hydra_cfg = HydraConfig.get()
    chosen = hydra_cfg.runtime.choices.get("stage")
    try:
        stages = compose_stage_configs(list(hydra_cfg.overrides.task))
        for cfg in stages:
            validate(cfg, world_size=world_size_from_env())
        names = stages[0].curriculum.stages
        if chosen is not None and chosen not in names:
            raise ConfigError(f"stage: {chosen!r} is not in curriculum.stages; valid: {', '.join(names)}")
        device = resolve_device(stages[0].run.device)
    except ConfigError as e:
        fail("config error", str(e), 2)

    import torch  # after validation: a bad config should not pay for importing torch's world

    if stages[0].run.threads:
        torch.set_num_threads(stages[0].run.threads)
    pd = init_parallel(stages[0].parallel, device)
    try:
        records = run_curriculum(stages, pd, only=names.index(chosen) if chosen is not None else None)
    except StageError as e:
        fail("stage error", str(e), 1)
    except ConfigError as e:  # found while preparing the data (e.g. an empty split), before any step
        fail("config error", str(e), 2)
    if pd.is_rank0:
        print(summary_table(records))


if __name__ == "__main__":
    main()
