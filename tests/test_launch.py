"""Launch scripts under launch/: syntax, the argv they build, SLURM requeue, Hydra launcher.

`torchrun`, `srun`, `scontrol` and `deepspeed` are replaced by small fakes on PATH that
print their argv (as JSON) or record calls, so the scripts run end to end on a laptop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from deepspeed.launcher.runner import fetch_hostfile
from deepspeed.launcher.runner import parse_args as deepspeed_parse_args
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.distributed.run import get_args_parser as torchrun_parser

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])

_FAKE_TORCHRUN = """#!{python}
import json, os, signal, sys, time
node = os.environ.get("SLURM_NODEID", "-")
keys = ("OMP_NUM_THREADS", "PET_SIGNALS_TO_HANDLE", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
        "CUDA_DEVICE_MAX_CONNECTIONS", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "SRUN_CPUS_PER_TASK",
        "NODE_RANK", "NPROC_PER_NODE")
line = "FAKE " + json.dumps({"prog": os.path.basename(sys.argv[0]), "argv": sys.argv[1:],
                            "node": node, "env": {k: os.environ.get(k) for k in keys}}) + "\\n"
# One write(2) of < PIPE_BUF bytes: the nodes share stdout, and print() may split the line.
os.write(1, line.encode())
wait_dir = os.environ.get("FAKE_WAIT_DIR")
if wait_dir:
    def record(sig, frame):
        with open(os.path.join(wait_dir, f"signal-{node}"), "w") as f:
            f.write(signal.Signals(sig).name)
        sys.exit(0)
    signal.signal(signal.SIGUSR1, record)
    signal.signal(signal.SIGTERM, record)
    open(os.path.join(wait_dir, f"ready-{node}"), "w").close()
    time.sleep(60)
    sys.exit(3)
"""

# Runs the command once per node, as srun would with --ntasks-per-node=1, with the per-task
# SLURM variables set, and forwards SIGUSR1/SIGTERM to the tasks like srun does.
_FAKE_SRUN = """#!{python}
import os, signal, subprocess, sys
args = sys.argv[1:]
while args and args[0].startswith("-"):
    args.pop(0)
hosts = os.environ["FAKE_HOSTS"].split()
procs = []
for node in range(int(os.environ["SLURM_NNODES"])):
    env = dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node), SLURM_LOCALID="0",
               SLURMD_NODENAME=hosts[node])
    procs.append(subprocess.Popen(args, env=env))
def forward(sig, frame):
    for p in procs:
        p.send_signal(sig)
signal.signal(signal.SIGUSR1, forward)
signal.signal(signal.SIGTERM, forward)
sys.exit(max(p.wait() for p in procs))
"""

_FAKE_SCONTROL = """#!/bin/bash
case "$1 ${2:-}" in
    "show hostnames") for h in $FAKE_HOSTS; do echo "$h"; done ;;
    "requeue "*) echo "requeue $2" >> "$FAKE_SCONTROL_LOG" ;;
    *) echo "fake scontrol: unexpected $*" >&2; exit 1 ;;
esac
"""


@pytest.fixture
def fakebin(tmp_path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("torchrun", _FAKE_TORCHRUN), ("deepspeed", _FAKE_TORCHRUN),
                       ("srun", _FAKE_SRUN), ("scontrol", _FAKE_SCONTROL)):
        path = bin_dir / name
        path.write_text(text.replace("{python}", sys.executable))
        path.chmod(0o755)
    return bin_dir


def _env(fakebin: Path, **extra: str) -> dict[str, str]:
    # A clean environment: inherited RUN_DIR / NCCL_* / SLURM_* must not leak into the test.
    base = {"PATH": f"{fakebin}{os.pathsep}{os.environ['PATH']}", "HOME": os.environ.get("HOME", "/tmp"),
            "LANG": "C.UTF-8"}
    return base | extra


def _fake_calls(stdout: str) -> list[dict]:
    return [json.loads(line[5:]) for line in stdout.splitlines() if line.startswith("FAKE ")]


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_scripts_parse(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    if script.suffix == ".sh" and script.name != "env.sh":  # sourced or submitted otherwise
        assert os.access(script, os.X_OK), f"{script} is not executable"


def _slurm_env(fakebin: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    return _env(fakebin, SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[001-002]", SLURM_NNODES="2",
                SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="16", SLURM_SUBMIT_DIR=str(tmp_path),
                LAUNCH_DIR=str(LAUNCH), FAKE_HOSTS="gpu001 gpu002",
                FAKE_SCONTROL_LOG=str(tmp_path / "scontrol.log"), **extra)


def test_slurm_runs_one_torchrun_per_node_with_shared_rendezvous_and_run_dir(fakebin, tmp_path):
    overrides = ["model=tiny", "trainer.max_steps=10", "+tags=[a, b]"]
    done = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), *overrides], cwd=tmp_path,
                          env=_slurm_env(fakebin, tmp_path), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = sorted(_fake_calls(done.stdout), key=lambda c: c["node"])
    assert [c["node"] for c in calls] == ["0", "1"]
    run_dir = tmp_path / "runs" / "4242"
    assert run_dir.is_dir()
    for node, call in enumerate(calls):
        assert call["argv"] == [
            "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=4", "--rdzv_backend=c10d",
            f"--rdzv_endpoint=gpu001:{20000 + 4242}", "--rdzv_id=4242", "--max-restarts=3",
            "-m", "mbert_train.train", f"run.dir={run_dir}", *overrides]
        assert call["env"]["NODE_RANK"] == str(node) and call["env"]["NPROC_PER_NODE"] == "4"
        assert "SIGUSR1" in call["env"]["PET_SIGNALS_TO_HANDLE"]
        assert call["env"]["SRUN_CPUS_PER_TASK"] == "16"
        assert call["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
        assert int(call["env"]["OMP_NUM_THREADS"]) == max(1, (os.cpu_count() or 1) // 4)
        # The real torchrun accepts exactly this argv.
        parsed = torchrun_parser().parse_args(call["argv"])
        assert parsed.rdzv_endpoint == f"gpu001:{20000 + 4242}" and parsed.module
        assert parsed.training_script == "mbert_train.train"
    assert not (tmp_path / "scontrol.log").exists()


def test_slurm_run_dir_override_with_spaces(fakebin, tmp_path):
    run_dir = tmp_path / "shared runs" / "x"
    done = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch")], cwd=tmp_path,
                          env=_slurm_env(fakebin, tmp_path, RUN_DIR=str(run_dir), MASTER_PORT="31000"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for call in _fake_calls(done.stdout):
        assert f"run.dir={run_dir}" in call["argv"]
        assert "--rdzv_endpoint=gpu001:31000" in call["argv"]


def _wait_for(paths: list[Path], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, f"timed out waiting for {paths}"
        time.sleep(0.05)


def test_slurm_time_limit_signal_checkpoints_then_requeues(fakebin, tmp_path):
    wait_dir = tmp_path / "wait"
    wait_dir.mkdir()
    job = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), "model=tiny"], cwd=tmp_path,
                           env=_slurm_env(fakebin, tmp_path, FAKE_WAIT_DIR=str(wait_dir)),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for([wait_dir / "ready-0", wait_dir / "ready-1"])
        job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 delivers to the batch shell
        out, err = job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 0, err
    # Every node's torchrun got SIGUSR1 (it forwards it to the ranks, which checkpoint).
    assert (wait_dir / "signal-0").read_text() == "SIGUSR1"
    assert (wait_dir / "signal-1").read_text() == "SIGUSR1"
    assert (tmp_path / "scontrol.log").read_text().split("\n")[0] == "requeue 4242"
    assert "requeueing 4242" in out


def test_torchrun_single(fakebin, tmp_path):
    env = _env(fakebin, NPROC_PER_NODE="2", RUN_DIR=str(tmp_path / "r"))
    done = subprocess.run([str(LAUNCH / "torchrun_single.sh"), "model=tiny", "parallel.tensor_parallel=2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    (call,) = _fake_calls(done.stdout)
    assert call["argv"] == ["--standalone", "--nnodes=1", "--nproc_per_node=2", "--max-restarts=0",
                            "-m", "mbert_train.train", f"run.dir={tmp_path / 'r'}", "model=tiny",
                            "parallel.tensor_parallel=2"]
    torchrun_parser().parse_args(call["argv"])
    # Restarts on request: torchrun then restarts a failed group, which resumes from RUN_DIR.
    restarts = subprocess.run([str(LAUNCH / "torchrun_single.sh")], cwd=tmp_path,
                              env=env | {"MAX_RESTARTS": "1"}, capture_output=True, text=True, timeout=60)
    (call,) = _fake_calls(restarts.stdout)
    assert "--max-restarts=1" in call["argv"] and f"run.dir={tmp_path / 'r'}" in call["argv"]
    default = subprocess.run([str(LAUNCH / "torchrun_single.sh")], cwd=tmp_path, env=_env(fakebin),
                             capture_output=True, text=True, timeout=60)
    (call,) = _fake_calls(default.stdout)
    run_dirs = list((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 1 and f"run.dir=runs/{run_dirs[0].name}" in call["argv"]
    assert "--nproc_per_node=1" in call["argv"]


def test_torchrun_multinode_requires_shared_settings(fakebin, tmp_path):
    env = _env(fakebin, NNODES="3", NODE_RANK="2", MASTER_ADDR="head", MASTER_PORT="29600",
               NPROC_PER_NODE="8", RUN_DIR=str(tmp_path / "r"), MAX_RESTARTS="5")
    done = subprocess.run([str(LAUNCH / "torchrun_multinode.sh"), "model=bert-base"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    (call,) = _fake_calls(done.stdout)
    assert call["argv"] == ["--nnodes=3", "--node_rank=2", "--nproc_per_node=8", "--rdzv_backend=c10d",
                            "--rdzv_endpoint=head:29600", "--rdzv_id=mbert-3-29600", "--max-restarts=5",
                            "-m", "mbert_train.train", f"run.dir={tmp_path / 'r'}", "model=bert-base"]
    env.pop("RUN_DIR")
    missing = subprocess.run([str(LAUNCH / "torchrun_multinode.sh")], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "RUN_DIR" in missing.stderr and not _fake_calls(missing.stdout)


def test_deepspeed_launch(fakebin, tmp_path):
    hostfile = LAUNCH / "hostfile.example"
    assert list(fetch_hostfile(str(hostfile)).items()) == [("node001", 8), ("node002", 8)]
    env = _env(fakebin, HOSTFILE=str(hostfile), RUN_DIR=str(tmp_path / "r"))
    done = subprocess.run([str(LAUNCH / "deepspeed_launch.sh"), "model=bert-large", "parallel.zero_stage=2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    (call,) = _fake_calls(done.stdout)
    assert call["prog"] == "deepspeed"
    args = deepspeed_parse_args(call["argv"])
    assert args.hostfile == str(hostfile) and args.no_local_rank and args.module
    assert args.master_port == 29500
    assert args.user_script == "mbert_train.train"
    assert args.user_args == [f"run.dir={tmp_path / 'r'}", "model=bert-large", "parallel.zero_stage=2"]
    with_master = subprocess.run([str(LAUNCH / "deepspeed_launch.sh")], cwd=tmp_path,
                                 env=env | {"MASTER_ADDR": "node002"}, capture_output=True, text=True,
                                 timeout=60)
    assert deepspeed_parse_args(_fake_calls(with_master.stdout)[0]["argv"]).master_addr == "node002"
    no_hosts = subprocess.run([str(LAUNCH / "deepspeed_launch.sh")], cwd=tmp_path,
                              env=_env(fakebin, HOSTFILE=str(tmp_path / "nope")), capture_output=True,
                              text=True, timeout=60)
    assert no_hosts.returncode == 2 and "hostfile.example" in no_hosts.stderr


def test_env_sh_defaults_and_overrides(tmp_path):
    script = ('set -u; source "$1"; echo "$OMP_NUM_THREADS $NCCL_DEBUG $TORCH_NCCL_ASYNC_ERROR_HANDLING '
              '$NCCL_ASYNC_ERROR_HANDLING $CUDA_DEVICE_MAX_CONNECTIONS $TORCH_ELASTIC_SHUTDOWN_TIMEOUT"')
    env = {"PATH": os.environ["PATH"], "NPROC_PER_NODE": "2", "NCCL_DEBUG": "INFO"}
    done = subprocess.run(["bash", "-c", script, "_", str(LAUNCH / "env.sh")], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    omp, debug, async_new, async_old, conns, shutdown = done.stdout.split()
    assert int(omp) == max(1, (os.cpu_count() or 1) // 2)
    assert (debug, async_new, async_old, conns) == ("INFO", "1", "1", "1")
    assert 0 < int(shutdown) < 120  # must finish before SLURM's 120 s warning runs out


def test_hydra_submitit_launcher_config_composes(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "config.yaml").write_text("defaults:\n  - _self_\nrun:\n  dir: runs/x\n")
    monkeypatch.chdir(REPO)  # `file://launch` is relative to the working directory
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra.searchpath=[file://launch]",
                                                       "hydra/launcher=slurm"],
                      return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher["tasks_per_node"] == launcher["gpus_per_node"] == 8
    assert launcher["signal_delay_s"] == 120 and launcher["max_num_timeout"] > 0
    assert launcher["additional_parameters"] == {"requeue": True}
    assert launcher["setup"] == [f"source {REPO}/launch/env.sh"]
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra.searchpath=[file://launch]",
                                                       "hydra/launcher=slurm",
                                                       "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher.partition == "gpu"
