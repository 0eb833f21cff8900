#!/usr/bin/env bash
# Single-node training with torchrun: one process per GPU on this machine.
#
#   launch/torchrun_single.sh model=bert-base parallel.tensor_parallel=2
#   NPROC_PER_NODE=4 RUN_DIR=runs/base-tp2 launch/torchrun_single.sh model=bert-base parallel.tensor_parallel=2
#
# Arguments are Hydra overrides for mbert-train. RUN_DIR is fixed here, once, before any
# rank starts, so every rank (and every torchrun restart) uses the same run directory and a
# restarted run resumes from its latest checkpoint.
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if [ -z "${NPROC_PER_NODE:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        NPROC_PER_NODE=$(nvidia-smi --list-gpus | wc -l)
    else
        NPROC_PER_NODE=1
    fi
fi
export NPROC_PER_NODE
# shellcheck source=launch/env.sh
source "$LAUNCH_DIR/env.sh"

RUN_DIR=${RUN_DIR:-runs/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$RUN_DIR"

# --standalone starts a private rendezvous on a free local port, so two single-node runs on
# one machine do not collide on 29500.
exec torchrun \
    --standalone \
    --nnodes=1 \
    --nproc_per_node="$NPROC_PER_NODE" \
    --max-restarts="${MAX_RESTARTS:-0}" \
    -m mbert_train.train \
    run.dir="$RUN_DIR" \
    "$@"
