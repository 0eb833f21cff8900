"""torchrun elastic with a node range, for real on loopback: two "nodes" (two torchrun agents of
launch/torchrun_elastic.sh, `--nnodes 1:2`, 2 ranks each) train at DP4; one node is SIGKILLed
after a checkpoint; the other restarts at DP2, resumes from that checkpoint (resharded), keeps
the global batch through trainer.global_batch_size, and finishes like an uninterrupted DP2 run."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from mbert_train.config import TrainerConfig
from mbert_train.errors import UserError
from tests.train_util import FAST, env, losses, train

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
STEPS = 10
GLOBAL_BATCH = 32  # micro-batch 8: accum 1 at DP4, 2 at DP2
OVERRIDES = [*(o for o in FAST if not o.startswith("data.num_workers=")), "data.num_workers=0",
             f"trainer.max_steps={STEPS}", "trainer.checkpoint_every=2", "trainer.eval_every=0",
             "trainer.export_hf=false", "logging.wandb_mode=disabled", "parallel.zero_stage=1",
             "parallel.timeout_s=10"]
# Rendezvous waits cut from torch's defaults (last call 30 s, a dead node noticed after 3 missed
# 5 s heartbeats) to keep the test short; the last call still leaves the second agent time to
# join at the start on a loaded machine (if it joins later, the agents restart the group at DP4).
RDZV_CONF = "join_timeout=120,last_call_timeout=10,close_timeout=10,keep_alive_interval=2,keep_alive_max_attempt=3"
_INHERITED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
              "NNODES", "NODE_RANK", "NPROC_PER_NODE", "RUN_DIR", "MAX_RESTARTS", "RDZV_ID", "RDZV_CONF")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent_env(cache: str, **extra: str) -> dict[str, str]:
    e = env(cache)
    for key in [*_INHERITED, *(k for k in e if k.startswith(("SLURM_", "TORCHELASTIC_", "PET_")))]:
        e.pop(key, None)
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e['PATH']}"  # the script calls `torchrun`
    return e | extra


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _kill_node(agent: subprocess.Popen, workers: set[int]) -> None:
    """SIGKILL a node: its torchrun agent and every rank (each rank runs in a session of its own)."""
    for pid in [agent.pid, *workers, *_children(agent.pid)]:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    agent.wait()


@pytest.mark.slow
def test_node_loss_restarts_on_the_remaining_node_and_finishes(tmp_path, corpus_cache):
    reference = tmp_path / "reference"
    train(reference, corpus_cache, [*OVERRIDES, f"trainer.global_batch_size={GLOBAL_BATCH}"], nproc=2)

    run_dir = tmp_path / "elastic"
    latest = run_dir / "checkpoints" / "latest"
    shared = {"NNODES": "1:2", "NPROC_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
              "RDZV_ID": uuid.uuid4().hex, "RUN_DIR": str(run_dir), "GLOBAL_BATCH_SIZE": str(GLOBAL_BATCH),
              "MAX_RESTARTS": "3", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "30"}
    logs = [tmp_path / "survivor.log", tmp_path / "lost.log"]
    agents: list[subprocess.Popen] = []
    workers: list[set[int]] = [set(), set()]
    try:
        # The survivor hosts the rendezvous store (is_host), as the MASTER_ADDR node must survive.
        for log, is_host in zip(logs, ("true", "false")):
            with open(log, "w") as out:
                agents.append(subprocess.Popen(
                    [str(LAUNCH / "torchrun_elastic.sh"), *OVERRIDES], cwd=tmp_path, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True,
                    env=_agent_env(corpus_cache, **shared, RDZV_CONF=f"{RDZV_CONF},is_host={is_host}")))
        deadline = time.monotonic() + 300
        while not latest.exists() and all(a.poll() is None for a in agents) and time.monotonic() < deadline:
            for agent, found in zip(agents, workers):
                found.update(_children(agent.pid))
            time.sleep(0.05)
        assert latest.exists() and all(a.poll() is None for a in agents), \
            "\n".join(f"--- {log.name}:\n{log.read_text()[-3000:]}" for log in logs)
        lost_at = time.monotonic()
        _kill_node(agents[1], workers[1])
        try:
            agents[0].wait(timeout=400)
        except subprocess.TimeoutExpired:
            pass
        finished_at = time.monotonic()
        text = logs[0].read_text()
        assert agents[0].returncode == 0, f"rc {agents[0].returncode}:\n{text[-6000:]}"
    finally:
        for agent, found in zip(agents, workers):
            if agent.poll() is None:
                _kill_node(agent, found)
            else:
                for pid in found:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass

    banners = [line for line in text.splitlines() if line.startswith("[mbert-train] run dir")]
    assert "world 4 = TP 1 x DP 4" in banners[0] and "global batch 32 = micro 8 x accum 1 x DP 4" in banners[0], \
        banners
    assert "world 2 = TP 1 x DP 2" in banners[-1] and "global batch 32 = micro 8 x accum 2 x DP 2" in banners[-1], \
        banners
    resharded = re.findall(r"\[mbert-train\] resharding checkpoint (step_\d+) from (TP\d+xDP\d+) ZeRO-1 to "
                           r"(TP\d+xDP\d+) ZeRO-1", text)
    assert resharded and resharded[-1][1:] == ("TP1xDP4", "TP1xDP2"), text[-4000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == list(range(1, STEPS + 1)), steps
    final, uninterrupted = losses(run_dir)[STEPS], losses(reference)[STEPS]
    print(f"node lost after {resharded[-1][0]}; survivor finished {finished_at - lost_at:.1f} s later; "
          f"final loss {final:.5f} vs uninterrupted {uninterrupted:.5f}")
    assert abs(final - uninterrupted) <= 0.02 * uninterrupted, (final, uninterrupted)


def test_global_batch_size_derives_grad_accum():
    t = TrainerConfig(micro_batch_size=8, global_batch_size=32)
    assert [t.at_data_parallel(dp).grad_accum for dp in (1, 2, 4)] == [4, 2, 1]
    assert TrainerConfig(micro_batch_size=8, grad_accum=3).at_data_parallel(2).grad_accum == 3  # off: unchanged


@pytest.mark.parametrize("settings, dp, needles", [
    (dict(micro_batch_size=8, global_batch_size=30), None, ("trainer.global_batch_size=30", "trainer.micro_batch_size=8")),
    (dict(micro_batch_size=8, global_batch_size=-8), None, ("trainer.global_batch_size=-8",)),
    (dict(micro_batch_size=8, global_batch_size=32), 3, ("trainer.global_batch_size=32", "x DP 3 = 24")),
    (dict(micro_batch_size=8, global_batch_size=32, grad_accum=2), 2, ("trainer.grad_accum=2", "leave")),
])
def test_global_batch_size_errors(settings, dp, needles):
    with pytest.raises(ValueError) as exc:
        TrainerConfig(**settings).at_data_parallel(dp)
    text = str(exc.value)
    assert "\n" not in text and all(n in text for n in needles), text
    if dp is not None:
        assert isinstance(exc.value, UserError)


def test_global_batch_that_does_not_split_over_dp_is_one_line(tmp_path, corpus_cache):
    proc = train(tmp_path / "run", corpus_cache, [*OVERRIDES, "trainer.global_batch_size=24"], nproc=2, check=False,
                 timeout=240)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mbert-train: error:")]
    # torchrun reports the failed ranks with a traceback of its own; the ranks print one line each.
    assert proc.returncode != 0 and len(errors) == 2 and "mbert_train/" not in proc.stderr, proc.stderr[-3000:]
    assert all("trainer.global_batch_size=24 is not a multiple of trainer.micro_batch_size=8 x DP 2 = 16" in line
               for line in errors), errors
    assert not (tmp_path / "run").exists()  # refused before the run dir is made


_FAKE_TORCHRUN = """#!{python}
import json, sys
print("FAKE " + json.dumps(sys.argv[1:]))
"""


def test_elastic_script_argv(tmp_path):
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    (fakebin / "torchrun").write_text(_FAKE_TORCHRUN.format(python=sys.executable))
    (fakebin / "torchrun").chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in _INHERITED}
    environ = base | {"PATH": f"{fakebin}{os.pathsep}{base['PATH']}", "NNODES": "2:4", "MASTER_ADDR": "head",
                      "MASTER_PORT": "29600", "RUN_DIR": str(tmp_path / "run"), "GLOBAL_BATCH_SIZE": "256",
                      "RDZV_CONF": "last_call_timeout=10"}
    done = subprocess.run([str(LAUNCH / "torchrun_elastic.sh"), "model=bert-base"], env=environ,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("FAKE ")]
    assert json.loads(line[5:]) == [
        "--nnodes=2:4", "--nproc_per_node=8", "--rdzv_backend=c10d", "--rdzv_endpoint=head:29600",
        "--rdzv_id=mbert-elastic-29600", "--rdzv-conf=last_call_timeout=10", "--max-restarts=3", "-m",
        "mbert_train.train", f"run.dir={tmp_path / 'run'}", "trainer.global_batch_size=256", "model=bert-base"]

    for name, value, needle in (("NNODES", "2", "NNODES=2 must be a range MIN:MAX"),
                                ("GLOBAL_BATCH_SIZE", "", "set GLOBAL_BATCH_SIZE")):
        refused = subprocess.run([str(LAUNCH / "torchrun_elastic.sh")], env=environ | {name: value},
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and needle in refused.stderr and "FAKE" not in refused.stdout, refused.stderr
