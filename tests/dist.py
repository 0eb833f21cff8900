"""Spawn N CPU ranks with gloo and a short timeout; the one helper every distributed test uses.

The ranks are forked from a forkserver that imported torch, transformers' MegatronBERT,
DeepSpeed, Hydra and mbert_train once per session (tests/preload.py): a spawned interpreter
re-imports them (4-6 s per rank, the larger part of a test's time on 2 cores). The forkserver itself is a fresh
interpreter that only imported modules (no threads, no process group), so each rank still
starts clean; it is handed this process's environment, as spawn would inherit it.

`spawn` runs a function on ranks that joined a process group; `Ranks` starts ranks with only a
launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...), for code that joins the group
itself, as `mbert-train` does under torchrun (tests/train_util.py)."""

from __future__ import annotations

import datetime
import os
import signal
import socket
import time
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 60
_PRELOAD = ["tests.preload"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """Pids of `pid`'s child processes (a rank's DataLoader workers), from /proc."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # takes effect when the server starts (the first call)
    return ctx


def _launcher_env(environ: dict, rank: int, world: int, port: int) -> dict:
    """What torchrun sets for a rank; nothing at world 1, as for a plain `python -m` start."""
    if world == 1:
        return dict(environ)
    return {**environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
            "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0"}


def _fresh_interpreter_state(environ: dict) -> None:
    """What a forked rank inherits from the forkserver and a new interpreter would not have:
    the environment is this test's, and multiprocessing's default start method is unset again
    (forkserver children inherit it; DataLoader workers would pickle their dataset to it)."""
    os.environ.clear()
    os.environ.update(environ)
    mp.set_start_method(None, force=True)


def _entry(rank: int, world: int, port: int, environ: dict, fn, args, errors) -> None:
    _fresh_interpreter_state(environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
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
    ctx = _context()
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(_entry, args=(world, free_port(), dict(os.environ), fn, args, errors), nprocs=world,
                           start_method="forkserver")
    except Exception as exc:
        detail = errors.get() if not errors.empty() else str(exc)
        raise AssertionError(detail) from None


def _rank_entry(rank: int, world: int, port: int, environ: dict, cwd: str | None, fn, args) -> None:
    _fresh_interpreter_state(_launcher_env(environ, rank, world, port))
    if cwd is not None:
        os.chdir(cwd)
    fn(rank, *args)


class Ranks:
    """`fn(rank, *args)` on `world` forked ranks with a launcher's environment, joined to no
    process group. Like torchrun, once a rank fails the others get `grace_s` to end on their own
    and are then killed: a peer of a dead rank never waits out its timeout."""

    def __init__(self, fn, world: int, *args, environ: dict | None = None, cwd: str | None = None,
                 grace_s: float = 10.0):
        ctx, port = _context(), free_port()
        self.grace_s = grace_s
        self.procs = [ctx.Process(target=_rank_entry, args=(r, world, port, dict(environ or os.environ), cwd, fn, args),
                                  name=f"rank{r}") for r in range(world)]
        for proc in self.procs:
            proc.start()

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs]

    def poll(self) -> int | None:
        """None while a rank runs and none failed; else the exit status (the first failure's)."""
        codes = [proc.exitcode for proc in self.procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            return failed[0]
        return None if None in codes else 0

    def signal(self, sig: int) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> int:
        """The exit status once every rank ended: 0, the first failure's status, or -SIGKILL for
        ranks killed `grace_s` after another failed. Raises TimeoutError (all ranks killed)."""
        deadline, failed_at = time.monotonic() + timeout, None
        while any(proc.exitcode is None for proc in self.procs):
            now = time.monotonic()
            if failed_at is None and self.poll() not in (None, 0):
                failed_at = now
            if now > deadline or (failed_at is not None and now > failed_at + self.grace_s):
                self.kill()
                if now > deadline:
                    raise TimeoutError(f"ranks still running after {timeout} s")
            for proc in self.procs:
                proc.join(0.05)
        return self.poll()

    def kill(self) -> None:
        """SIGKILL every rank still running (its DataLoader workers notice and exit)."""
        for proc in self.procs:
            if proc.exitcode is None:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            proc.join()
