"""Spawn N CPU ranks with gloo and a short timeout; the one helper every distributed test uses.

The ranks are forked from a forkserver that imported torch, transformers' MegatronBERT and
mbert_train once per session: a spawned interpreter re-imports them (4-5 s per rank, the
larger part of a test's time on 2 cores). The forkserver itself is a fresh interpreter that
only imported modules (no threads, no process group), so each rank still starts clean; it is
handed this process's environment, as spawn would inherit it."""

from __future__ import annotations

import datetime
import os
import socket
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 60
_PRELOAD = ["torch.distributed", "transformers.models.megatron_bert.modeling_megatron_bert", "mbert_train.trainer", "tests.dist"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, environ: dict, fn, args, errors) -> None:
    os.environ.clear()
    os.environ.update(environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        fn(*args)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    """Run `fn(*args)` on `world` spawned ranks; re-raise the first rank's failure here."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # takes effect when the server starts (the first call)
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(_entry, args=(world, free_port(), dict(os.environ), fn, args, errors), nprocs=world,
                           start_method="forkserver")
    except Exception as exc:
        detail = errors.get() if not errors.empty() else str(exc)
        raise AssertionError(detail) from None
