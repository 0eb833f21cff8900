"""The parallel layout: world = TP x DP, its process groups, and DeepSpeed's `mpu` interface.

Rank r sits at tp_rank = r % TP and dp_rank = r // TP, so the ranks of one tensor-parallel
group are adjacent (on one node under torchrun), as in Megatron-LM.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from mbert_train.errors import UserError, first_line

if TYPE_CHECKING:
    from mbert_train.model.config import ModelConfig


@dataclass(frozen=True)
class ParallelDims:
    """Validated degrees of parallelism; errors show the numbers and the fix."""

    world_size: int
    tensor_parallel: int = 1

    def __post_init__(self) -> None:
        if self.tensor_parallel < 1:
            raise ValueError(f"parallel.tensor_parallel={self.tensor_parallel} must be >= 1")
        if self.world_size % self.tensor_parallel:
            raise ValueError(
                f"world size {self.world_size} is not divisible by parallel.tensor_parallel="
                f"{self.tensor_parallel}; launch a multiple of {self.tensor_parallel} processes "
                f"or set parallel.tensor_parallel to a divisor of {self.world_size}")

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.tensor_parallel

    def tp_rank(self, rank: int) -> int:
        return rank % self.tensor_parallel

    def dp_rank(self, rank: int) -> int:
        return rank // self.tensor_parallel

    def check_model(self, cfg: "ModelConfig") -> None:
        problem = model_problem(cfg, self.tensor_parallel)
        if problem:
            raise ValueError(problem)


def model_problem(cfg: "ModelConfig", tp: int) -> str | None:
    """Why a model cannot be split over `tp` tensor-parallel ranks (with the fix), or None: the
    heads and the MLP width are divided among the ranks."""
    if cfg.num_heads % tp:
        return (f"model.num_heads={cfg.num_heads} is not divisible by parallel.tensor_parallel={tp}; "
                f"choose a tensor_parallel that divides {cfg.num_heads}")
    if cfg.intermediate_size % tp:
        return (f"model.intermediate_size={cfg.intermediate_size} is not divisible by "
                f"parallel.tensor_parallel={tp}; choose a tensor_parallel that divides it")
    return None


class ParallelState:
    """Process groups of one layout, with the method names DeepSpeed expects of an `mpu`."""

    def __init__(self, dims: ParallelDims, rank: int,
                 tp_group: dist.ProcessGroup | None, dp_group: dist.ProcessGroup | None):
        self.dims = dims
        self.rank = rank
        self.tp_group = tp_group
        self.dp_group = dp_group

    @property
    def tp_rank(self) -> int:
        return self.dims.tp_rank(self.rank)

    @property
    def dp_rank(self) -> int:
        return self.dims.dp_rank(self.rank)

    # DeepSpeed `mpu` interface (engine.py, zero/stage_1_and_2.py, runtime/utils.py).
    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.dims.tensor_parallel

    def get_model_parallel_group(self):
        return self.tp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dims.data_parallel

    def get_data_parallel_group(self):
        return self.dp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_parallel(tensor_parallel: int, *, timeout_s: float = 600.0) -> ParallelState:
    """Join the default process group from the launcher's env (torchrun, deepspeed, srun) and
    build the TP/DP groups. Without a launcher this starts a one-process group on loopback, so
    DeepSpeed and the layers see real (trivial) groups either way.
    """
    # Every group gets the timeout: `new_group` without one falls back to torch's default
    # (30 min gloo, 10 min NCCL), and a rank stalled in a TP or DP collective would hang that long.
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ and "SLURM_NTASKS" in os.environ:
            _env_from_slurm()
        if "WORLD_SIZE" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
        world = int(os.environ["WORLD_SIZE"])
        ParallelDims(world_size=world, tensor_parallel=tensor_parallel)  # fail before any rendezvous
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(default_backend(), timeout=timeout)
    world, rank = dist.get_world_size(), dist.get_rank()
    dims = ParallelDims(world_size=world, tensor_parallel=tensor_parallel)
    tp = dims.tensor_parallel
    tp_group = dp_group = None
    # Every rank must create every group, in the same order.
    for dp in range(dims.data_parallel):
        ranks = list(range(dp * tp, (dp + 1) * tp))
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            tp_group = group
    for t in range(tp):
        ranks = list(range(t, world, tp))
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            dp_group = group
    return ParallelState(dims, rank, tp_group, dp_group)


# How gloo, NCCL (blocking wait) and the TCP store word a collective or rendezvous that ran
# past its timeout ("Timed out waiting 5000ms for recv", "ran for 600015 milliseconds before
# timing out", "Timed out after 601 seconds waiting for clients").
_TIMEOUT = re.compile(r"timed out|timing out|timeout", re.IGNORECASE)
_PEER_GONE = re.compile(r"connection closed by peer|connection reset by peer", re.IGNORECASE)


class CollectiveTimeout(UserError):
    """A collective waited longer than `parallel.timeout_s`, or lost a rank that failed first."""


def collective_failure(exc: BaseException, timeout_s: float) -> CollectiveTimeout | None:
    """The one-line error for a collective that failed because of *another* rank (stalled,
    stopped, dead), or None if `exc` is something else."""
    if not isinstance(exc, RuntimeError):
        return None
    text = str(exc)
    rank = f"rank {dist.get_rank()}" if dist.is_initialized() else "this rank"
    if _TIMEOUT.search(text):
        return CollectiveTimeout(
            f"{rank} waited longer than parallel.timeout_s={timeout_s:g} s for the other ranks in a collective: "
            f"one is stalled, stopped or dead (its log says why); raise parallel.timeout_s only if a step or "
            f"checkpoint legitimately takes longer ({first_line(exc)})")
    if _PEER_GONE.search(text):
        return CollectiveTimeout(f"{rank} lost its connection to another rank, which failed or was killed "
                                 f"first; that rank's log has the cause ({first_line(exc)})")
    return None


def _env_from_slurm() -> None:
    """One task per GPU under `srun` (or hydra-submitit-launcher), no torchrun: derive the
    rendezvous from SLURM's variables. The port is a function of the job id so every task
    agrees on it without talking; MASTER_ADDR/MASTER_PORT already set take precedence."""
    env = os.environ
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = env.get("SLURM_LAUNCH_NODE_IPADDR") or _first_host(env.get("SLURM_JOB_NODELIST", ""))
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env.get("SLURM_LOCALID", "0"))


def _first_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as `gpu[003-005,009],cpu1` (`gpu003`)."""
    head = nodelist.split(",")[0]
    if "[" not in head:
        return head or "127.0.0.1"
    prefix, ranges = head.split("[", 1)
    return prefix + ranges.split("-")[0].split(",")[0].rstrip("]")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
