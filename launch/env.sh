# Environment for mbert-train ranks; sourced by every launcher in launch/ (and by you:
# `source launch/env.sh` before a hand-written torchrun). Every value is a default that an
# already-exported variable overrides. Never put secrets (WANDB_API_KEY, HF_TOKEN) here:
# export them from your shell or the cluster's secret store.

# CPU threads per rank. torchrun forces OMP_NUM_THREADS=1 when unset; the CPU side of
# training (tokenised batch collation, dataloader workers, optimizer on CPU offload) wants a
# fair share of the node's cores instead, without oversubscribing them across ranks.
if [ -z "${OMP_NUM_THREADS:-}" ]; then
    _mbert_cores=$(nproc 2>/dev/null || echo 1)
    _mbert_ranks=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
    _mbert_ranks=${_mbert_ranks##*:}
    OMP_NUM_THREADS=$(( _mbert_cores / (_mbert_ranks > 0 ? _mbert_ranks : 1) ))
    [ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1
    export OMP_NUM_THREADS
    unset _mbert_cores _mbert_ranks
fi

# Tear down the NCCL communicator when a collective fails or times out instead of hanging
# forever: the rank then raises, torchrun sees the failure and restarts the workers (or the
# job fails fast and SLURM can requeue it). TORCH_NCCL_* is the name since torch 2.2; the
# NCCL_* spelling is what older torch reads.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-$TORCH_NCCL_ASYNC_ERROR_HANDLING}

# One hardware work queue per GPU, so kernels run in the order they are launched: Megatron
# tensor parallelism launches the TP all-reduce before the next GEMM and relies on that
# order to overlap communication with computation.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

# InfiniBand. NCCL picks the HCAs itself; set NCCL_IB_HCA (e.g. mlx5_0,mlx5_1) only when
# the node has adapters NCCL must not use. A longer IB timeout (4.096 us * 2^22, about 17 s)
# and more retries ride out congestion on large jobs instead of aborting the collective.
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export NCCL_IB_RETRY_CNT=${NCCL_IB_RETRY_CNT:-7}
# Set to 1 on clusters without InfiniBand so NCCL goes straight to TCP sockets.
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}

# Interfaces for NCCL's bootstrap and socket transport: anything but loopback and Docker
# bridges, which are never the inter-node network and can make ranks connect to themselves.
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}

# WARN prints NCCL errors without INFO's per-rank init chatter; use INFO to debug hangs.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# torchrun forwards these signals to the ranks (and then stops): SIGUSR1 is what SLURM's
# `--signal=USR1@120` and launch/slurm.sbatch send before the time limit, and the trainer
# writes a checkpoint on SIGTERM, SIGINT and SIGUSR1. torchrun signals each rank's whole
# process group, DataLoader workers included; they ignore these and leave the stop to their
# rank. PET_* is read by torch >= 2.8's torchrun, TORCHELASTIC_* by older ones.
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCHELASTIC_SIGNALS_TO_HANDLE=${TORCHELASTIC_SIGNALS_TO_HANDLE:-$PET_SIGNALS_TO_HANDLE}
# Seconds torchrun waits for ranks to finish that checkpoint before SIGKILL (default 30).
# Keep it below the 120 s SLURM warning.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}
# After a restart (--max-restarts) the ranks must not rendezvous through the store torchrun
# kept from the failed attempt: its keys, unprefixed, still hold the dead ranks' addresses and
# the restarted group connects to them or hangs (pytorch/pytorch#135712; still so in torch
# 2.13). With 1, rank 0 of every attempt hosts a fresh store on a fresh port.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

# Unbuffered Python output so SLURM log files show progress as it happens.
export PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}
# HF tokenizers' own thread pool deadlocks in forked dataloader workers; ranks do not need it.
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
