#!/bin/bash
# One node: NPROC processes (GPUs, or CPU ranks with gloo when there is no GPU).
#   NPROC=2 launch/local.sh preset=cpu_demo parallel.cp=2
#   NPROC=8 launch/local.sh parallel.dp=2 parallel.cp=4
set -euo pipefail
exec torchrun --standalone --nproc_per_node="${NPROC:-1}" train.py "$@"
