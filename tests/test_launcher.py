"""A rank started by a launcher dies with it: SIGKILL to torchrun leaves no rank training and
writing checkpoints (`mbert_train.launcher`); the race with a launcher that is gone before the
rank asks, and the watchdog where prctl is not available, at unit level on tiny processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mbert_train.lease import holder_problem
from tests.test_preemption import Run


def _children(pid: int) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(Path("/proc", entry, "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
        except OSError:
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_ranks_die_within_seconds_when_torchrun_is_killed(tmp_path, corpus_cache):
    overrides = ["trainer.max_steps=10000", "trainer.checkpoint_every=1", "trainer.eval_every=0",
                 "trainer.export_hf=false", "logging.wandb_mode=disabled"]
    torchrun = Run(tmp_path, tmp_path / "run", corpus_cache, overrides, nproc=2)
    family: list[int] = []
    try:
        torchrun.wait_for_steps(2)
        ranks = torchrun.children()
        family = ranks + [pid for rank in ranks for pid in _children(rank)]  # and their DataLoader workers
        assert len(ranks) == 2, ranks
        os.kill(torchrun.proc.pid, signal.SIGKILL)
        killed = time.time()
        torchrun.proc.wait()
        deadline = time.monotonic() + 10
        while any(map(_alive, family)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in family if _alive(pid)], "ranks outlived torchrun"
    finally:
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        torchrun.kill()
    root = torchrun.run_dir / "checkpoints"
    written = [json.loads((p / "meta.json").read_text())["time"] for p in root.glob("step_*")]
    assert written and max(written) < killed + 1.0, "a checkpoint was committed after the kill"
    assert (root / "latest").stat().st_mtime < killed + 1.0
    assert holder_problem(torchrun.run_dir) is None  # rank 0's lease is left, and a restart takes it at once


# ---- the launcher watch, unit level ---------------------------------------------------------------

RANK = """
import os, sys, time
from mbert_train.launcher import die_with_launcher
launcher = int(sys.argv[1]) if len(sys.argv) > 1 else os.getppid()
print(die_with_launcher(launcher, poll_s=0.1, use_prctl=sys.argv[2] == "prctl" if len(sys.argv) > 2 else True),
      os.getpid(), flush=True)
time.sleep(60)
"""
LAUNCHER = """
import os, subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid()), sys.argv[2]],
                        preexec_fn=os.setsid, stdout=subprocess.PIPE, text=True)  # as torch elastic does
print(rank.stdout.readline().strip(), flush=True)
time.sleep(60)
"""


def test_a_rank_whose_launcher_is_gone_already_dies_at_once():
    # Its parent (this process) is not the launcher it names: reparented before it could ask.
    proc = subprocess.run([sys.executable, "-c", RANK, "1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL and proc.stdout == ""


@pytest.mark.parametrize("how", ["prctl", "watchdog"])
def test_a_rank_dies_with_its_launcher(how):
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, RANK, how], stdout=subprocess.PIPE, text=True)
    reported, pid = launcher.stdout.readline().split()
    assert reported == how and _alive(int(pid))
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 5
    while _alive(int(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(int(pid))
