#!/usr/bin/env bash
# Multi-node training with torchrun and the c10d rendezvous. Run this once on every node:
#
#   export NNODES=4 MASTER_ADDR=node001 MASTER_PORT=29500 NPROC_PER_NODE=8
#   export RUN_DIR=/shared/runs/megatron-1.3b     # same path, on a shared file system
#   NODE_RANK=0 launch/torchrun_multinode.sh model=megatron-1.3b parallel.tensor_parallel=2
#   NODE_RANK=1 launch/torchrun_multinode.sh model=megatron-1.3b parallel.tensor_parallel=2
#   ...
#
# MASTER_ADDR:MASTER_PORT hosts the rendezvous (any one of the nodes). With c10d the global
# ranks are assigned at rendezvous and NODE_RANK is informational, but keep it distinct.
# --max-restarts lets torchrun restart all workers after a failure (e.g. a NCCL timeout);
# the restarted trainer resumes from RUN_DIR/checkpoints/latest. RUN_DIR is required
# because each node would otherwise invent its own timestamped directory.
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

: "${NNODES:?set NNODES to the number of nodes}"
: "${NODE_RANK:?set NODE_RANK to the index of this node, 0..NNODES-1}"
: "${MASTER_ADDR:?set MASTER_ADDR to the host running the rendezvous (e.g. the first node)}"
: "${RUN_DIR:?set RUN_DIR to a directory on a file system shared by all nodes}"
MASTER_PORT=${MASTER_PORT:-29500}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
export NPROC_PER_NODE
# shellcheck source=launch/env.sh
source "$LAUNCH_DIR/env.sh"

mkdir -p "$RUN_DIR"

exec torchrun \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --nproc_per_node="$NPROC_PER_NODE" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
    --rdzv_id="${RDZV_ID:-mbert-$NNODES-$MASTER_PORT}" \
    --max-restarts="${MAX_RESTARTS:-3}" \
    -m mbert_train.train \
    run.dir="$RUN_DIR" \
    "$@"
