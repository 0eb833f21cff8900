#!/usr/bin/env bash
# Multi-node training with the `deepspeed` launcher and a hostfile. Run it once, on the
# first host; it starts the ranks on every host in the hostfile over ssh (pdsh).
#
#   cp launch/hostfile.example launch/hostfile      # then list your hosts in it
#   RUN_DIR=/shared/runs/large launch/deepspeed_launch.sh model=bert-large parallel.zero_stage=2
#
# Environment reaching remote hosts: the launcher forwards NCCL_*, PYTHON* and the variables
# listed in ./.deepspeed_env or ~/.deepspeed_env (one NAME=value per line); it does not
# source launch/env.sh there, so list what you need in .deepspeed_env.
#
# The launcher normally appends `--local_rank=N` to each rank's argv; --no_local_rank turns
# that off because Hydra would reject it as an override (ranks read LOCAL_RANK from the
# environment instead). The trainer also drops a stray --local_rank for runs started by
# hand with a plain `deepspeed` command.
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HOSTFILE=${HOSTFILE:-$LAUNCH_DIR/hostfile}
[ -f "$HOSTFILE" ] || { echo "deepspeed_launch.sh: hostfile $HOSTFILE not found; copy launch/hostfile.example" >&2; exit 2; }
# shellcheck source=launch/env.sh
source "$LAUNCH_DIR/env.sh"

# Fixed once here, on the launching host, and passed to every rank in argv.
RUN_DIR=${RUN_DIR:-runs/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$RUN_DIR"

# With one host in the hostfile the launcher starts every rank here, without ssh, whatever the
# host is called, yet it still demands passwordless ssh to that host (a reachability check, and
# `hostname -I` for the rendezvous address). Skip both: the rendezvous is on this machine.
single_host=()
if [ "$(grep -cE '^[[:space:]]*[^#[:space:]]' "$HOSTFILE")" -eq 1 ]; then
    single_host=(--no_ssh_check)
    MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
fi

master=()
if [ -n "${MASTER_ADDR:-}" ]; then
    master=(--master_addr="$MASTER_ADDR")
fi

exec deepspeed \
    --hostfile="$HOSTFILE" \
    ${single_host[@]+"${single_host[@]}"} \
    ${master[@]+"${master[@]}"} \
    --master_port="${MASTER_PORT:-29500}" \
    --no_local_rank \
    --module mbert_train.train \
    run.dir="$RUN_DIR" \
    "$@"
