"""longtrain entry point: python train.py [overrides], or torchrun ... train.py [overrides].

All logic lives in longtrain/; the command itself, its Hydra composition and its exit
codes (0 done; 1 a stage failed its gate, diverged or a rank hung; 2 bad input; 75
stopped by SIGTERM/SIGUSR1 after saving a checkpoint; 130 Ctrl-C) are ``longtrain.cli.main``.
"""

import os
import sys

# Everything runs offline: datasets/transformers must never try the Hub (set before they load).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

try:
    from longtrain.cli import main  # noqa: E402
except KeyboardInterrupt:  # Ctrl-C while torch loads: nothing has started, nothing to say
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog=sys.argv[0]))
