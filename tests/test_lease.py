"""The run-dir lease: one live run per run dir (`mbert_train.lease`).

Holders are real processes (a few lines of Python that take a lease and sleep; no torch), so
"alive" and "dead" are what the lease sees on this host; runs are trained in-process on forked
gloo ranks where the process boundary proves nothing, and as real `mbert-train` processes where
it does (two runs side by side on one run dir)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mbert_train import lease as lease_mod
from mbert_train.checkpoint import CheckpointDir, CheckpointError
from mbert_train.lease import LEASE_FILE, Lease, RunDirHeld, holder_problem
from mbert_train.train import RUN_MARKER, run_dir_problem
from tests.train_util import FAST, command, env, losses

HOLDER = """
import sys, time
from mbert_train import lease
lease.HEARTBEAT_S = float(sys.argv[2])
lease.Lease.acquire(sys.argv[1], command="holder")
print("held", flush=True)
time.sleep(300)
"""
TMP = "checkpoints/.tmp-step_00000003"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Holder:
    """Another process holding `run_dir`'s lease, beating every `interval` seconds."""

    def __init__(self, run_dir: Path, interval: float = 5.0):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), str(interval)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run dir in which a run was writing the checkpoint of step 3."""
    run_dir = tmp_path / "run"
    (run_dir / TMP / "optim").mkdir(parents=True)
    (run_dir / TMP / "optim" / "__0_0.distcp").write_bytes(b"being written")
    (run_dir / RUN_MARKER).write_text("")
    return run_dir


def _rewrite(run_dir: Path, **changes) -> None:
    path = run_dir / LEASE_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_live_holder_is_named_in_one_line_and_its_temp_dir_is_never_collected(run_dir):
    holder = Holder(run_dir)
    try:
        with pytest.raises(RunDirHeld) as refused:
            Lease.acquire(run_dir, command="second")
        line = str(refused.value)
        assert "\n" not in line and f"run.dir={run_dir} is in use" in line
        assert f"host {socket.gethostname()} pid {holder.proc.pid} since 20" in line and "point run.dir" in line
        # A clean-up that holds no lease keeps off (the bug: it deleted the live run's temp dir).
        with pytest.raises(CheckpointError, match=f"pid {holder.proc.pid}"):
            CheckpointDir(run_dir).collect_garbage()
        assert (run_dir / TMP / "optim" / "__0_0.distcp").read_bytes() == b"being written"
    finally:
        holder.kill()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(run_dir):
    holder = Holder(run_dir)
    holder.kill()
    assert holder_problem(run_dir) is None  # gone: nothing it could still write
    started = time.monotonic()
    lease = Lease.acquire(run_dir, command="second", say=pytest.fail)
    try:
        assert time.monotonic() - started < 2
        assert f"took over the lease of host {socket.gethostname()} pid {holder.proc.pid}" in lease.note
        assert "its process is gone" in lease.note
        assert CheckpointDir(run_dir, lease=lease).collect_garbage() == [run_dir / TMP]
    finally:
        lease.release()
    assert not (run_dir / LEASE_FILE).exists()


def test_a_silent_holder_on_another_host_is_taken_over_after_its_timeout(run_dir):
    holder = Holder(run_dir)
    holder.kill()
    _rewrite(run_dir, host="node-gone-7", heartbeat=time.time() - 3600, timeout_s=1.5)
    said = []
    started = time.monotonic()
    lease = Lease.acquire(run_dir, command="second", say=said.append)
    try:
        assert 1.5 <= time.monotonic() - started < 5
        assert said and "held by host node-gone-7" in said[0] and "waiting up to 2 s" in said[0]
        assert "took over the lease of host node-gone-7" in lease.note and "no heartbeat for 2 s" in lease.note
    finally:
        lease.release()


def test_a_beating_holder_on_another_host_is_refused(run_dir, monkeypatch):
    holder = Holder(run_dir, interval=0.2)
    try:
        monkeypatch.setattr(lease_mod.socket, "gethostname", lambda: "login-node")  # the holder looks remote
        with pytest.raises(RunDirHeld, match="its heartbeat goes on"):
            Lease.acquire(run_dir, command="second", say=lambda line: None)
    finally:
        holder.kill()


def test_a_holder_whose_lease_was_taken_over_stops_before_it_writes(tmp_path):
    lease = Lease.acquire(tmp_path, command="first")  # its first beat comes after this test
    ckpt = CheckpointDir(tmp_path, lease=lease)
    ckpt.begin(1)  # held: writes go ahead
    (tmp_path / LEASE_FILE).unlink()  # a vanished record is put back by its holder
    assert lease.problem() is None
    assert json.loads((tmp_path / LEASE_FILE).read_text())["id"] == lease.record["id"]
    _rewrite(tmp_path, id="another-run", host="node-9", pid=4242)  # taken over while it stalled
    with pytest.raises(CheckpointError, match="was taken over by host node-9 pid 4242 .*stops without writing"):
        ckpt.commit(1)
    assert (tmp_path / "checkpoints" / ".tmp-step_00000001").is_dir()  # nothing renamed
    lease.release()
    assert json.loads((tmp_path / LEASE_FILE).read_text())["id"] == "another-run"  # not ours to delete


def test_a_run_dir_holding_only_a_lease_is_a_run_dir(tmp_path):
    (tmp_path / LEASE_FILE).write_text("{}")  # a first start killed right after taking it
    assert run_dir_problem(tmp_path) is None


# ---- runs on a held run dir (in-process ranks) ---------------------------------------------------


def test_a_run_is_refused_by_a_live_holder_and_takes_over_from_a_dead_one(run_dir, corpus_cache):
    from tests.test_resume_control import failure, train

    holder = Holder(run_dir)
    try:
        line = failure(run_dir, ["trainer.max_steps=1"])
    finally:
        holder.kill()
    assert f"run.dir={run_dir} is in use by another mbert-train run (host {socket.gethostname()} pid " \
           f"{holder.proc.pid} since" in line
    assert sorted(p.name for p in run_dir.iterdir()) == [LEASE_FILE, RUN_MARKER, "checkpoints"]  # untouched
    assert (run_dir / TMP / "optim" / "__0_0.distcp").exists()
    out = train(run_dir, ["trainer.max_steps=1"])
    assert f"| took over the lease of host {socket.gethostname()} pid {holder.proc.pid}" in out
    assert "its process is gone" in out
    assert not (run_dir / TMP).exists() and (run_dir / "checkpoints" / "step_00000001").is_dir()
    assert not (run_dir / LEASE_FILE).exists()  # released at the end


def _sigterm_at_the_first_step(run_dir: Path, out: Path) -> None:
    import contextlib

    from mbert_train.config import compose_config
    from mbert_train.train import run
    from tests.test_resume_control import RUN

    def stop_when_training() -> None:
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and '"loss"' in metrics.read_text()):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_training, daemon=True).start()
    with open(out, "w") as f, contextlib.redirect_stdout(f), pytest.raises(SystemExit) as stop:
        run(compose_config([*RUN, f"run.dir={run_dir}", "trainer.max_steps=1000"]), str(run_dir))
    assert stop.value.code == 0


def test_the_lease_is_released_on_a_one_line_error_and_on_a_stop_signal(tmp_path, corpus_cache):
    from tests.dist import spawn
    from tests.test_resume_control import failure

    line = failure(tmp_path / "eval", ["trainer.eval_only=true"])
    assert "found no checkpoint" in line and not (tmp_path / "eval" / LEASE_FILE).exists()
    run_dir = tmp_path / "stopped"
    spawn(_sigterm_at_the_first_step, 1, run_dir, tmp_path / "stopped.stdout")
    assert "[mbert-train] stop signal: " in (tmp_path / "stopped.stdout").read_text()
    assert not (run_dir / LEASE_FILE).exists()


# ---- real processes -------------------------------------------------------------------------------

SIDE_BY_SIDE = ["trainer.max_steps=20", "trainer.checkpoint_every=1", "trainer.keep_last=100", "trainer.eval_every=0",
                "trainer.export_hf=false", "logging.wandb_mode=disabled"]


@pytest.mark.slow
def test_a_second_mbert_train_is_refused_while_the_first_trains_undisturbed(tmp_path, corpus_cache):
    from tests.test_preemption import Run

    first = Run(tmp_path, tmp_path / "first", corpus_cache, SIDE_BY_SIDE, nproc=1)
    # Undisturbed, alongside: the losses do not depend on timing.
    reference = Run(tmp_path, tmp_path / "reference", corpus_cache, SIDE_BY_SIDE, nproc=1)
    try:
        while not (first.run_dir / LEASE_FILE).exists():
            assert first.proc.poll() is None, first.err.read_text()[-3000:]
            time.sleep(0.05)
        second = subprocess.run(command(1, [*FAST, *SIDE_BY_SIDE, f"run.dir={first.run_dir}"]), env=env(corpus_cache),
                                capture_output=True, text=True, timeout=300)
        assert first.proc.poll() is None, "the first run ended before the second was refused; give it more steps"
        assert second.returncode == 2
        (error,) = [line for line in second.stderr.splitlines() if line.startswith("mbert-train: error:")]
        assert error.startswith(f"mbert-train: error: run.dir={first.run_dir} is in use by another mbert-train run "
                                f"(host {socket.gethostname()} pid {first.proc.pid} since 20"), error
        assert "its process is alive on this host" in error and "point run.dir at another folder" in error
        for run in (first, reference):
            rc, _out, err = run.finish()
            assert rc == 0, err[-3000:]
    finally:
        first.kill()
        reference.kill()
    assert losses(first.run_dir) == losses(reference.run_dir) and len(losses(first.run_dir)) == 20
    steps = sorted(p.name for p in (first.run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert len(steps) == 20
    for step in steps:
        assert sorted(p.name for p in (first.run_dir / "checkpoints" / step).rglob("*")) == \
               sorted(p.name for p in (reference.run_dir / "checkpoints" / step).rglob("*")), step
    # Resumable: continued from step 10, it trains steps 11-12 exactly as the undisturbed run did.
    resumed = Run(tmp_path, first.run_dir, corpus_cache, [*SIDE_BY_SIDE, "trainer.resume=10", "trainer.max_steps=12"],
                  nproc=1)
    rc, out, err = resumed.finish()
    assert rc == 0 and "resumed at step 10" in out, err[-3000:]
    assert [losses(first.run_dir)[s] for s in (11, 12)] == [losses(reference.run_dir)[s] for s in (11, 12)]
