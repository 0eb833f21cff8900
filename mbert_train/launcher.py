"""A rank started by a launcher dies with it.

torchrun starts each rank with `setsid`, in a process group of its own, so a SIGKILL to
torchrun or to torchrun's process group (an OOM kill of the agent, `kill -9 -- -PGID`) leaves the ranks running: they would go on training and writing checkpoints into a run dir that
a restarted job is about to use. A rank started by a launcher (torchrun sets
TORCHELASTIC_RUN_ID, the deepspeed launcher CROSS_RANK) therefore asks the kernel to SIGKILL it
when its parent dies (Linux `prctl(PR_SET_PDEATHSIG)`); where that is unavailable a daemon
thread polls the parent pid every second and SIGKILLs the rank itself. SIGKILL, not a stop
signal: a rank whose launcher is gone must not write a checkpoint on its way out.

The kernel sends the signal when the *thread* that forked the rank ends. torch elastic forks the
ranks with `subprocess.Popen` on the agent's main thread (`SubprocessContext._start`, called by
`agent.run()`), the deepspeed launcher likewise (`deepspeed.launcher.launch.main`), so it fires
when the launcher process ends and never when one of its helper threads does.

A launcher that dies after forking the rank but before the rank asks has left it with another
parent already (init or a subreaper): the rank compares its parent after asking with the one it
saw before, and dies at once if they differ. The launcher's pid is the parent the rank sees at
the start of `main`, the earliest point this code runs. A launcher killed during the rank's
first seconds (its imports) goes unnoticed here; torchrun's ranks on the node whose agent serves
the rendezvous store then fail at their start anyway, when they meet in that store.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping

LAUNCHER_VARS = ("TORCHELASTIC_RUN_ID", "CROSS_RANK")
"""Set in every rank by torchrun (torch elastic) and by `deepspeed.launcher.launch`."""
_PR_SET_PDEATHSIG = 1


def started_by_launcher(environ: Mapping[str, str] = os.environ) -> bool:
    return any(name in environ for name in LAUNCHER_VARS)


def _set_parent_death_signal(sig: int) -> bool:
    """`prctl(PR_SET_PDEATHSIG, sig)`; False where it is not available (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _watch(launcher_pid: int, poll_s: float) -> None:
    while os.getppid() == launcher_pid:  # the thread ends with the process
        time.sleep(poll_s)
    _die()


def die_with_launcher(launcher_pid: int, *, poll_s: float = 1.0, use_prctl: bool = True) -> str:
    """Make this process die (SIGKILL) when `launcher_pid` is no longer its parent; at once if it
    already is not. Returns how: "prctl" (the kernel) or "watchdog" (a thread polling `poll_s`)."""
    how = "prctl" if use_prctl and _set_parent_death_signal(signal.SIGKILL) else "watchdog"
    if os.getppid() != launcher_pid:  # gone before the kernel knew whom to watch
        _die()
    if how == "watchdog":
        threading.Thread(target=_watch, args=(launcher_pid, poll_s), name="mbert-launcher-watchdog",
                         daemon=True).start()
    return how
