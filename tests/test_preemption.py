"""How a job ends or begins on a cluster: a stop signal to the whole process group (scancel,
SLURM preemption and time limits, `timeout`, Ctrl-C), a stalled rank, a stale build lock."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mbert_train.data import DataConfig, build_loaders
from tests.dist import children, spawn
from tests.test_data_corpus import embedded_corpus
from tests.train_util import FAST, LAYOUTS, STEPS, command, env, losses, start, train

TIMEOUT_S = 8  # parallel.timeout_s of the stalled-rank test; start-up collectives must fit in it


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for_steps(run_dir: Path, n: int, poll, stderr, timeout: float = 240) -> None:
    """Until rank 0 has logged `n` training steps (a metrics line is written after its step)."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and metrics.read_text().count('"loss"') >= n):
        assert poll() is None, f"exited early ({poll()}):\n{stderr()[-3000:]}"
        assert time.monotonic() < deadline, "no training step logged"
        time.sleep(0.05)


class Run:
    """`mbert-train` (or torchrun) in a session of its own, output in files."""

    def __init__(self, tmp_path: Path, run_dir: Path, cache: str, overrides: list[str], nproc: int,
                 extra_env: dict | None = None):
        self.run_dir, self.out, self.err = run_dir, tmp_path / f"{run_dir.name}.out", tmp_path / f"{run_dir.name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(command(nproc, [*FAST, f"run.dir={run_dir}", *overrides]),
                                         env={**env(cache), **(extra_env or {})}, stdout=out, stderr=err,
                                         start_new_session=True)

    def wait_for_steps(self, n: int) -> None:
        _wait_for_steps(self.run_dir, n, self.proc.poll, self.err.read_text)

    def children(self) -> list[int]:
        return children(self.proc.pid)

    def dataloader_workers(self) -> list[int]:
        """Forked children: same command line (not the W&B service, also a child)."""
        cmdline = Path(f"/proc/{self.proc.pid}/cmdline").read_bytes()
        return [pid for pid in self.children() if Path(f"/proc/{pid}/cmdline").read_bytes() == cmdline]

    def finish(self, timeout: float = 180) -> tuple[int, str, str]:
        rc = self.proc.wait(timeout=timeout)
        return rc, self.out.read_text(), self.err.read_text()

    def kill(self) -> None:
        for pid in [*self.children(), self.proc.pid]:  # ranks and DataLoader workers too
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        self.proc.wait()


def _latest_step(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])


def _stop_with_the_process_group(run: Run, *, kill_workers: bool = False) -> tuple[int, str, str]:
    """SIGTERM to the whole process group once training runs, as scancel or `timeout` do."""
    run.wait_for_steps(1)
    workers = run.dataloader_workers() if kill_workers else []
    assert workers or not kill_workers, "no DataLoader worker found"
    os.killpg(run.proc.pid, signal.SIGTERM)
    for pid in workers:  # the DataLoader workers die at that very moment
        os.kill(pid, signal.SIGKILL)
    try:
        return run.finish()
    finally:
        run.kill()


def _resumes_exactly(runs: Path, run_dir: Path, cache: str, layout: str, stopped_at: int) -> None:
    nproc, overrides = LAYOUTS[layout]
    train(run_dir, cache, [*STEPS, *overrides], nproc=nproc)
    resumed, reference = losses(run_dir), losses(runs / layout)
    assert sorted(resumed) == list(range(1, 21)), "metrics.jsonl has each step once"
    assert [resumed[s] for s in range(stopped_at + 1, 21)] == [reference[s] for s in range(stopped_at + 1, 21)]


@pytest.mark.slow
def test_sigterm_to_the_process_group_checkpoints_and_resumes_exactly(runs, tmp_path, corpus_cache):
    """Under torchrun (2 ranks, ZeRO-1). The DataLoader workers get the signal too; they leave the
    stop to the main process."""
    nproc, overrides = LAYOUTS["dp2_zero1"]
    run = Run(tmp_path, tmp_path / "dp2_zero1", corpus_cache, [*STEPS, *overrides], nproc)
    rc, out, err = _stop_with_the_process_group(run)
    step = _latest_step(run.run_dir)
    assert 1 <= step < 20 and f"checkpoint written at step {step}" in out, out + err
    assert "DataLoader worker" not in err, err
    # torchrun forwards the signal to each rank's process group, then re-raises it itself
    # (SignalException, status 1) whatever the ranks did; no rank failed.
    assert err.count("Traceback") == 1 and "SignalException" in err, err
    _resumes_exactly(runs, run.run_dir, corpus_cache, "dp2_zero1", step)


@pytest.mark.slow
def test_stop_survives_dataloader_workers_dying_with_it(runs, tmp_path, corpus_cache):
    """One process: SIGTERM to its group, its DataLoader workers SIGKILLed at that moment; the
    stop still checkpoints the last completed step (not a half-fetched one), exits 0, and the run
    resumes exactly. The run also starts beside a stale extension lock: a run killed while
    DeepSpeed built its shm_comm extension leaves one, and torch would wait on it forever;
    nothing on the CPU path builds an extension at all."""
    extensions = tmp_path / "torch_extensions"
    (extensions / "deepspeed_shm_comm").mkdir(parents=True)
    (extensions / "deepspeed_shm_comm" / "lock").touch()
    run = Run(tmp_path, tmp_path / "workers_killed", corpus_cache, [*STEPS, *LAYOUTS["tp1"][1]], 1,
              extra_env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    rc, out, err = _stop_with_the_process_group(run, kill_workers=True)
    assert rc == 0, err
    step = _latest_step(run.run_dir)
    assert 1 <= step < 20 and f"checkpoint written at step {step}" in out, out + err
    built = sorted(str(p.relative_to(extensions)) for p in extensions.rglob("*"))
    assert built == ["deepspeed_shm_comm", "deepspeed_shm_comm/lock"], built
    _resumes_exactly(runs, run.run_dir, corpus_cache, "tp1", step)


@pytest.mark.slow
def test_a_stalled_rank_ends_the_job_with_one_line_naming_the_timeout(tmp_path, corpus_cache):
    overrides = [*LAYOUTS["dp2_zero0"][1], "trainer.max_steps=100000", "trainer.eval_every=0",
                 "trainer.checkpoint_every=100000", "trainer.export_hf=false", "logging.wandb_mode=disabled",
                 f"parallel.timeout_s={TIMEOUT_S}"]
    run = start(tmp_path / "stalled", corpus_cache, overrides, nproc=2)
    try:
        _wait_for_steps(tmp_path / "stalled", 2, run.ranks.poll, lambda: run.output("err"))
        rank0, rank1 = run.ranks.pids
        os.kill(rank1, signal.SIGSTOP)
        stopped = time.monotonic()
        while _running(rank0):
            assert time.monotonic() - stopped < 3 * TIMEOUT_S, "rank 0 still waits for the stopped rank"
            time.sleep(0.1)
        os.kill(rank1, signal.SIGKILL)
        proc = run.result(timeout=60)
    finally:
        run.ranks.kill()
    assert proc.returncode != 0
    err = proc.stderr
    errors = [line for line in err.splitlines() if line.startswith("mbert-train: error:")]
    assert len(errors) == 1 and f"parallel.timeout_s={TIMEOUT_S} " in errors[0], err
    assert [line for line in err.splitlines() if "Timed out" in line] == errors, "no traceback of the timeout"


def _wait_on_a_stalled_peer(timeout_s: float) -> None:
    from mbert_train.parallel.layout import collective_failure, init_parallel

    dp_layout = init_parallel(1, timeout_s=timeout_s)  # world 2 = DP 2
    tp_layout = init_parallel(2, timeout_s=timeout_s)  # world 2 = TP 2
    if dist.get_rank() == 1:
        time.sleep(4 * timeout_s)  # then exits: a group without the timeout sees "connection closed"
        return
    for group in (dp_layout.dp_group, tp_layout.tp_group):
        start = time.monotonic()
        with pytest.raises(RuntimeError) as info:
            dist.all_reduce(torch.ones(1), group=group)
        assert time.monotonic() - start < 1.5 * timeout_s, str(info.value)
        failure = collective_failure(info.value, timeout_s)
        assert failure is not None and f"parallel.timeout_s={timeout_s:g} s" in str(failure), str(info.value)


@pytest.mark.slow
def test_every_process_group_honours_the_timeout():
    spawn(_wait_on_a_stalled_peer, 2, 2.0)


def test_collective_failure_recognises_only_collective_errors():
    from mbert_train.parallel.layout import collective_failure

    assert collective_failure(RuntimeError("DataLoader worker (pid 1) is killed by signal"), 5) is None
    assert collective_failure(ValueError("timed out"), 5) is None
    lost = collective_failure(RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:1234"), 5)
    assert lost is not None and "failed or was killed first" in str(lost)


@pytest.mark.parametrize("value", ["0", "-5", "inf"])
def test_timeout_must_be_positive(tmp_path, corpus_cache, value):
    from mbert_train.config import compose_config
    from mbert_train.errors import UserError

    with pytest.raises(UserError, match=f"parallel.timeout_s={value}"):
        compose_config([f"parallel.timeout_s={value}"])
    if value == "0":  # and from the command line, one line
        proc = train(tmp_path / "zero", corpus_cache, [f"parallel.timeout_s={value}"], check=False, timeout=120)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines()[0].startswith("mbert-train: error: parallel.timeout_s=0"), proc.stderr


# ---- the loader's part, in this process --------------------------------------------------------
@pytest.fixture(scope="module")
def embedded_dir(corpus_cache) -> str:
    return embedded_corpus(corpus_cache)


def _loader(directory: str, workers: int):
    cfg = DataConfig(num_workers=workers, prefetch_factor=2)
    return build_loaders(cfg, directory, seed=3, micro_batch_size=8, dp_rank=0, dp_size=1)[0]


def _equal(x, y) -> bool:
    """Tensors by value; a `Packing` field by field (its tensors and its host ints)."""
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and torch.equal(x, y)
    if dataclasses.is_dataclass(x):
        return type(x) is type(y) and all(_equal(getattr(x, f.name), getattr(y, f.name))
                                          for f in dataclasses.fields(x))
    return x == y


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def _start_workers(loader) -> tuple[list[dict], list[int]]:
    before = set(children(os.getpid()))
    first = loader.take(2)
    workers = sorted(set(children(os.getpid())) - before)
    assert workers, "no DataLoader worker started"
    return first, workers


def test_dataloader_workers_ignore_a_stop_signal_sent_to_the_group(embedded_dir):
    reference = _loader(embedded_dir, 0).take(8)
    loader = _loader(embedded_dir, 1)
    first, workers = _start_workers(loader)
    for pid in workers:  # from another process, as scancel's or a terminal's (not the parent's)
        subprocess.run(["kill", "-TERM", str(pid)], check=True)
    try:
        rest = loader.take(6)  # more than the workers had prefetched: they must still be there
    finally:
        loader.close()
    assert _same(first + rest, reference)
    assert not any(_running(pid) for pid in workers), "close() stops the workers at once"


def test_a_dead_worker_fails_the_next_fetch_not_the_step_in_progress(embedded_dir):
    reference = _loader(embedded_dir, 0).take(8)
    loader = _loader(embedded_dir, 1)
    first, workers = _start_workers(loader)
    mark = loader.mark()
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    for pid in workers:  # until the exit is reported (all its threads gone), not reaping it
        while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            time.sleep(0.01)
    # What Python runs on that SIGCHLD at some bytecode of the step in progress, run now:
    # torch's handler would raise "DataLoader worker ... is killed by signal" right here.
    signal.getsignal(signal.SIGCHLD)(signal.SIGCHLD, None)
    try:
        with pytest.raises(RuntimeError, match="DataLoader worker"):
            loader.take(6)
        assert loader.mark() == mark, "a failed take() delivers nothing"
        rest = loader.take(6)  # restarts the workers where it was
    finally:
        loader.close()
    assert _same(first + rest, reference)


@pytest.mark.slow
def test_exit_does_not_wait_for_dataloader_workers(embedded_dir):
    """The workers ignore SIGTERM, which is how multiprocessing ends them at exit."""
    script = ("import sys; from tests.test_preemption import _loader; "
              "loader = _loader(sys.argv[1], 2); batch = next(loader); print('fetched', flush=True)")
    proc = subprocess.run([sys.executable, "-c", script, embedded_dir], capture_output=True, text=True, timeout=90,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0 and "fetched" in proc.stdout, proc.stderr


def test_a_stop_goes_ahead_when_the_fetch_finds_a_dead_worker():
    from types import SimpleNamespace

    from mbert_train.trainer import Trainer

    def take(n):
        raise RuntimeError("DataLoader worker (pid(s) 123) exited unexpectedly")

    trainer = Trainer.__new__(Trainer)
    trainer.train_loader = SimpleNamespace(take=take)
    trainer._stop_requested = True
    assert trainer._fetch(1) is None
    trainer._stop_requested = False
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        trainer._fetch(1)
