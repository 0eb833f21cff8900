#!/usr/bin/env bash
# Elastic multi-node training: torchrun with a node range. Run this once on every node:
#
#   export NNODES=2:4 MASTER_ADDR=node001 MASTER_PORT=29500 NPROC_PER_NODE=8
#   export RUN_DIR=/shared/runs/base GLOBAL_BATCH_SIZE=768   # same on every node
#   launch/torchrun_elastic.sh model=bert-base trainer.micro_batch_size=8
#
# NNODES=MIN:MAX: training starts once MIN nodes have joined (after waiting last_call_timeout,
# default 30 s, for more, up to MAX) and goes on while at least MIN are left.
# trainer.global_batch_size=GLOBAL_BATCH_SIZE fixes the samples per optimizer step; grad_accum is
# derived from it at each start (GLOBAL_BATCH_SIZE / (micro_batch_size x DP)), so every node
# count in the range trains on the same data stream. It must divide into micro-batches at every
# DP size the range allows: 768 = 6, 4 or 3 micro-batches of 8 on each of 16, 24 or 32 GPUs above.
#
# When a node is lost, its peers' collectives fail (at once when its processes are gone, at the
# latest after parallel.timeout_s when its network is), and the ranks exit. Each surviving agent
# stops its workers (SIGTERM; they exit within parallel.timeout_s, they cannot checkpoint without
# their peers), drops the dead node from the rendezvous once its heartbeat is missing
# (keep_alive_interval x keep_alive_max_attempt, default 15 s), waits last_call_timeout, and
# starts the group again with the nodes left, up to MAX_RESTARTS times. The new ranks resume
# from RUN_DIR/checkpoints/latest at the new DP size ("resharding checkpoint ... from TP1xDP16
# to TP1xDP8"); the steps since that checkpoint are trained again. A node that joins later
# makes the agents restart the group at the larger size in the same way.
# MASTER_ADDR:MASTER_PORT hosts the c10d rendezvous store: the node running it must survive.
# RDZV_CONF adds torchrun --rdzv-conf settings (e.g. last_call_timeout=10,keep_alive_interval=2).
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

: "${NNODES:?set NNODES to the node range MIN:MAX, e.g. 2:4}"
: "${MASTER_ADDR:?set MASTER_ADDR to the host running the rendezvous (it must outlive the others)}"
: "${RUN_DIR:?set RUN_DIR to a directory on a file system shared by all nodes}"
: "${GLOBAL_BATCH_SIZE:?set GLOBAL_BATCH_SIZE (trainer.global_batch_size), the same at every node count}"
case "$NNODES" in
    *:*) ;;
    *) echo "torchrun_elastic.sh: NNODES=$NNODES must be a range MIN:MAX (e.g. 1:2); for a fixed node" \
            "count use launch/torchrun_multinode.sh" >&2; exit 2 ;;
esac
MASTER_PORT=${MASTER_PORT:-29500}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
export NPROC_PER_NODE
# shellcheck source=launch/env.sh
source "$LAUNCH_DIR/env.sh"

RDZV_CONF_ARGS=()
if [ -n "${RDZV_CONF:-}" ]; then
    RDZV_CONF_ARGS=(--rdzv-conf="$RDZV_CONF")
fi

mkdir -p "$RUN_DIR"

exec torchrun \
    --nnodes="$NNODES" \
    --nproc_per_node="$NPROC_PER_NODE" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
    --rdzv_id="${RDZV_ID:-mbert-elastic-$MASTER_PORT}" \
    "${RDZV_CONF_ARGS[@]}" \
    --max-restarts="${MAX_RESTARTS:-3}" \
    -m mbert_train.train \
    run.dir="$RUN_DIR" \
    trainer.global_batch_size="$GLOBAL_BATCH_SIZE" \
    "$@"
