"""Scale-out paths run for real on one machine (CPU, gloo): two torchrun "nodes" on loopback, the
DeepSpeed launcher with a one-host hostfile, a Hydra `--multirun` sweep, and SLURM-style ranks
started without any launcher. (torchrun restarting a group after a SIGKILL: tests/test_elastic.py.)

Every distributed run is compared with the matching single-launcher run of the `runs` fixture:
same layout and seed give the same losses, bit for bit. Most stop at step 6 (SHORT): up to there
the learning rate is still in its warmup, which does not depend on max_steps, so their losses are
the reference's first 6.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.train_util import FAST, LAYOUTS, Forked, env, losses

pytestmark = pytest.mark.slow

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
SHORT = ["trainer.max_steps=6", "trainer.checkpoint_every=10", "trainer.eval_every=10"]
# Distributed settings a surrounding launcher (or a SLURM allocation running pytest) may have
# exported; each test sets the ones it means.
_INHERITED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
              "NNODES", "NODE_RANK", "NPROC_PER_NODE", "RUN_DIR", "HOSTFILE", "MAX_RESTARTS", "RDZV_ID")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cache: str, **extra: str) -> dict[str, str]:
    e = env(cache)
    for key in [*_INHERITED, *(k for k in e if k.startswith(("SLURM_", "TORCHELASTIC_", "PET_")))]:
        e.pop(key, None)
    # The launch scripts call `torchrun` / `deepspeed` by name: use this interpreter's.
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e['PATH']}"
    return e | extra


def _start(cmd: list, log: Path, environ: dict[str, str], cwd: Path) -> subprocess.Popen:
    # Output to files, not pipes: a rank blocked on a full pipe would stall its peers' collectives.
    with open(log, "w") as out:
        return subprocess.Popen([str(c) for c in cmd], env=environ, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _finish(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 300) -> list[str]:
    """Wait for every process; fail with the logs' tails if one times out or exits non-zero."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    texts = [log.read_text() for log in logs]
    status = ["still running at the timeout" if p.returncode is None else f"rc {p.returncode}" for p in procs]
    report = "\n".join(f"--- {log.name} ({st}):\n{t[-4000:]}" for st, log, t in zip(status, logs, texts))
    assert all(p.returncode == 0 for p in procs), report
    return texts


@contextmanager
def _reaped(marker: str, procs: list[subprocess.Popen]):
    """Whatever happens, no rank outlives the test: torchrun's workers run in sessions of their own,
    so they are found by a string unique to their command line."""
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        subprocess.run(["pkill", "-9", "-f", marker], check=False)


def _logged_steps(run_dir: Path) -> list[int]:
    """Steps of metrics.jsonl's training records, in file order (`losses` would hide repeats)."""
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r["step"] for r in records if "loss" in r]


def _first_steps(run_dir: Path, n: int = 6) -> dict[int, float]:
    return {step: loss for step, loss in losses(run_dir).items() if step <= n}


def _banners(text: str) -> list[str]:
    """Rank 0's start-up line, one per (re)start of the trainer."""
    return [line for line in text.splitlines() if line.startswith("[mbert-train] run dir")]


def test_two_torchrun_nodes_on_loopback_match_one_four_process_run(runs, tmp_path, corpus_cache):
    """launch/torchrun_multinode.sh twice (NODE_RANK 0 and 1, c10d rendezvous on 127.0.0.1) forms
    one TP2 x DP2 job that trains exactly like `torchrun --nproc_per_node 4`."""
    run_dir = tmp_path / "two-nodes"
    shared = {"NNODES": "2", "NPROC_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
              "RDZV_ID": uuid.uuid4().hex, "RUN_DIR": str(run_dir), "MAX_RESTARTS": "0"}
    overrides = [*FAST, *SHORT, *LAYOUTS["tp2_dp2_zero1"][1]]
    logs = [tmp_path / f"node{r}.log" for r in range(2)]
    procs: list[subprocess.Popen] = []
    with _reaped(f"run.dir={run_dir}", procs):
        for node, log in enumerate(logs):
            procs.append(_start([LAUNCH / "torchrun_multinode.sh", *overrides], log,
                                _env(corpus_cache, **shared, NODE_RANK=str(node)), tmp_path))
        texts = _finish(procs, logs)
    banners = [line for t in texts for line in _banners(t)]
    assert len(banners) == 1 and "world 4 = TP 2 x DP 2" in banners[0], banners
    assert _logged_steps(run_dir) == list(range(1, 7))
    assert losses(run_dir) == _first_steps(runs / "tp2_dp2_zero1")
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"


def test_deepspeed_launcher_with_a_one_host_hostfile(runs, tmp_path, corpus_cache):
    """launch/deepspeed_launch.sh (--no_local_rank) trains DP2 exactly like torchrun; a plain
    `deepspeed` call, which appends --local_rank=N to argv, also runs: the trainer strips it."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# this machine only\nlocalhost slots=2\n")
    run_dir = tmp_path / "ds-script"
    log = tmp_path / "ds-script.log"
    proc = _start([LAUNCH / "deepspeed_launch.sh", *FAST, *SHORT, *LAYOUTS["dp2_zero0"][1]], log,
                  _env(corpus_cache, HOSTFILE=str(hostfile), RUN_DIR=str(run_dir), MASTER_PORT=str(_free_port())),
                  tmp_path)
    with _reaped(f"run.dir={run_dir}", [proc]):
        (text,) = _finish([proc], [log])
    assert [b for b in _banners(text) if "world 2 = TP 1 x DP 2" in b], text[-3000:]
    assert "--local_rank" not in text.split("spawned with command", 1)[1].splitlines()[0]
    assert losses(run_dir) == _first_steps(runs / "dp2_zero0")

    plain_dir = tmp_path / "ds-plain"
    log = tmp_path / "ds-plain.log"
    cmd = ["deepspeed", f"--hostfile={hostfile}", "--no_ssh_check", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "--module", "mbert_train.train", *FAST, f"run.dir={plain_dir}",
           "trainer.max_steps=4", "trainer.checkpoint_every=4", "trainer.eval_every=0", "trainer.export_hf=false",
           *LAYOUTS["dp2_zero0"][1]]
    proc = _start(cmd, log, _env(corpus_cache), tmp_path)
    with _reaped(f"run.dir={plain_dir}", [proc]):
        (text,) = _finish([proc], [log])
    spawned = [line for line in text.splitlines() if "spawned with command" in line]
    assert len(spawned) == 2 and all(f"'--local_rank={r}'" in line for r, line in enumerate(spawned)), spawned
    assert [b for b in _banners(text) if "world 2 = TP 1 x DP 2" in b], text[-3000:]
    assert losses(plain_dir) == _first_steps(runs / "dp2_zero0", 4)


def test_hydra_multirun_gives_each_job_its_own_run_dir(tmp_path, corpus_cache):
    sweep = tmp_path / "sweep"
    argv = ["-m", *FAST, "trainer.max_steps=4", "trainer.checkpoint_every=4", "trainer.eval_every=0",
            "trainer.export_hf=false", "optim.lr=1e-3,2e-3", f"hydra.sweep.dir={sweep}"]
    # No launcher here: `python -m mbert_train.train -m` on a forked preloaded interpreter.
    run = Forked("mbert_train.train", argv, _env(corpus_cache), cwd=tmp_path)
    try:
        done = run.result(timeout=300)
    finally:
        run.ranks.kill()
    assert done.returncode == 0, done.stderr[-4000:]
    lrs = []
    for job in ("0", "1"):
        run_dir = sweep / job
        assert sorted(losses(run_dir)) == [1, 2, 3, 4], job
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"
        assert (run_dir / "checkpoints" / "step_00000004" / "meta.json").is_file()
        lrs.append(losses(run_dir, "lr"))
    # Same warmup, peak lr doubled: every step's lr doubles.
    assert all(math.isclose(lrs[1][s], 2 * lrs[0][s], rel_tol=1e-9) and lrs[0][s] > 0 for s in lrs[0]), lrs
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]


def test_slurm_tasks_without_torchrun_form_one_job(runs, tmp_path, corpus_cache):
    """What submitit's srun gives each task: SLURM_* only, no RANK/WORLD_SIZE, no run.dir. Two such
    processes must find each other, train as DP2, and share rank 0's run dir although each task's
    Hydra picked its own (distinct here: microsecond timestamps)."""
    out = tmp_path / "hydra-out"
    job = {"SLURM_JOB_ID": str(int.from_bytes(os.urandom(3), "big")), "SLURM_NTASKS": "2", "SLURM_NNODES": "1",
           "SLURM_NTASKS_PER_NODE": "2", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "127.0.0.1",
           "SLURM_NODELIST": "127.0.0.1", "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    overrides = [*FAST, *SHORT, *LAYOUTS["dp2_zero0"][1], f"hydra.run.dir={out}/${{now:%H-%M-%S-%f}}"]
    # Each task `python -m mbert_train.train` on a forked preloaded interpreter: no launcher.
    tasks = [Forked("mbert_train.train", overrides, _env(corpus_cache, **job, SLURM_PROCID=str(task),
                                                          SLURM_LOCALID=str(task)), cwd=tmp_path)
             for task in range(2)]
    try:
        done = [task.result(timeout=240) for task in tasks]
    finally:
        for task in tasks:
            task.ranks.kill()
    assert all(d.returncode == 0 for d in done), "\n".join(d.stdout[-3000:] + d.stderr[-3000:] for d in done)
    texts = [d.stdout + d.stderr for d in done]
    assert len(_banners(texts[0])) == 1 and "world 2 = TP 1 x DP 2" in _banners(texts[0])[0], texts[0][-3000:]
    assert not _banners(texts[1]), "task 1 must be rank 1 of the same job"
    (run_dir,) = [d for d in out.iterdir() if (d / "metrics.jsonl").exists()]
    assert f"run dir {run_dir} |" in _banners(texts[0])[0]
    assert _logged_steps(run_dir) == list(range(1, 7))
    assert losses(run_dir) == _first_steps(runs / "dp2_zero0")
    saved = json.loads((run_dir / "checkpoints" / "step_00000006" / "meta.json").read_text())
    assert saved["layout"]["data_parallel"] == 2, saved
