"""Run `mbert-train` for the tests: on ranks forked from the preloaded forkserver (tests/dist.py),
each one process running the console script's `main()` with torchrun's environment, or as the
real CLI (`mbert-train`, `torchrun -m mbert_train.train`) in a subprocess where the process
tree itself is under test (launchers, signals to a process group)."""

from __future__ import annotations

import atexit
import json
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

# Small enough for 2 CPU cores; dropout stays on so exact-resume covers the RNG state. A short
# process-group timeout: a rank left waiting by a hung or dead peer fails within a minute.
FAST = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.intermediate_size=128",
        "data.max_seq_length=64", "trainer.micro_batch_size=8", "trainer.log_every=1", "optim.warmup_steps=5",
        "logging.progress_bar=false", "data.num_workers=1", "trainer.eval_batches=2", "parallel.timeout_s=60"]


def env(cache: str) -> dict:
    e = dict(os.environ, MBERT_CACHE=cache, WANDB_SILENT="true", OMP_NUM_THREADS="1",
             PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="0")
    e.pop("WANDB_API_KEY", None)
    return e


def command(nproc: int, overrides: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "mbert_train.train", *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "mbert_train.train", *overrides]


def _wandb_off(overrides: list[str]) -> list[str]:
    """W&B off (3 s of every start-up) unless `overrides` set logging.* themselves, as the tests
    that check W&B's files do."""
    if any(o.startswith(("logging.wandb_mode=", "logging=")) for o in overrides):
        return list(overrides)
    return [*overrides, "logging.wandb_mode=disabled"]


def _python_rank(rank: int, target: str, argv: list[str], out_dir: str) -> None:
    """`python -m TARGET ARGV` (or `python TARGET.py ARGV`) on a forked rank, output to files."""
    for fd, name in ((1, "out"), (2, "err")):
        out = os.open(os.path.join(out_dir, f"rank{rank}.{name}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, fd)
        os.close(out)
    import torch

    if "OMP_NUM_THREADS" in os.environ:  # read when torch was imported, in the forkserver's environment
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    sys.argv = [target, *argv]
    # The module was preloaded by the forkserver; `python -m` runs it afresh as __main__ all the same.
    warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package", category=RuntimeWarning)
    try:
        if target.endswith(".py"):
            sys.path.insert(0, os.path.dirname(os.path.abspath(target)))  # as `python SCRIPT` puts it first
            runpy.run_path(target, run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    finally:  # what the interpreter's exit runs (a forked child skips it): closes DataLoader workers
        atexit._run_exitfuncs()


class Forked:
    """`python -m TARGET ARGV` on `nproc` ranks forked from the preloaded forkserver
    (tests/dist.py `Ranks`: torchrun's environment at nproc > 1), without the 5-6 s of imports of
    a new interpreter; `result()` gives what `subprocess.run` would: the exit status, and the
    ranks' stdout and stderr (in rank order)."""

    def __init__(self, target: str, argv: list[str], environ: dict, *, nproc: int = 1,
                 cwd: str | Path | None = None):
        from tests.dist import Ranks

        launcher = "python -m" if nproc == 1 else f"torchrun --nproc_per_node={nproc} -m"
        self.args = [*launcher.split(), target, *argv]
        self._out = tempfile.mkdtemp(prefix="forked-")
        self.ranks = Ranks(_python_rank, nproc, target, argv, self._out, environ=environ,
                           cwd=None if cwd is None else str(cwd))

    def output(self, name: str) -> str:
        files = [Path(self._out, f"rank{r}.{name}") for r in range(len(self.ranks.procs))]
        return "".join(f.read_text(errors="replace") for f in files if f.exists())

    def result(self, timeout: float = 400) -> subprocess.CompletedProcess:
        try:
            code = self.ranks.wait(timeout)
        except TimeoutError:
            raise subprocess.TimeoutExpired(" ".join(self.args), timeout, self.output("out"),
                                            self.output("err")) from None
        done = subprocess.CompletedProcess(self.args, code, self.output("out"), self.output("err"))
        shutil.rmtree(self._out, ignore_errors=True)
        return done


def run_python(target: str, argv: list[str], *, environ: dict | None = None, cwd: str | Path | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """`subprocess.run([python, -m, TARGET, *ARGV], capture_output=True, text=True)` on a forked rank."""
    return Forked(target, [str(a) for a in argv], dict(os.environ if environ is None else environ),
                  cwd=cwd).result(timeout)


def start(run_dir: Path, cache: str, overrides: list[str], *, nproc: int = 1, extra_env: dict | None = None,
          cwd: str | Path | None = None) -> Forked:
    """Start `mbert-train` with FAST settings in `run_dir` (None: Hydra's default output dir) on
    forked ranks, without waiting."""
    run = [] if run_dir is None else [f"run.dir={run_dir}"]
    return Forked("mbert_train.train", [*FAST, *run, *_wandb_off(overrides)], {**env(cache), **(extra_env or {})},
                  nproc=nproc, cwd=cwd)


def _check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        # Every rank's final error line first: the tail alone often shows only a peer's reaction.
        errors = "\n".join(line for line in proc.stderr.splitlines() if "Error:" in line or "error:" in line)
        raise AssertionError(f"{' '.join(proc.args)} failed ({proc.returncode}):\n{errors}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def train(run_dir: Path, cache: str, overrides: list[str], *, nproc: int = 1, check: bool = True,
          extra_env: dict | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    """Run mbert-train to its end on forked ranks (as `train_cli` would, without the 5-6 s of
    imports per process); W&B is off unless `overrides` set logging.*."""
    proc = start(run_dir, cache, overrides, nproc=nproc, extra_env=extra_env).result(timeout)
    return _check(proc) if check else proc


def train_cli(run_dir: Path, cache: str, overrides: list[str], *, nproc: int = 1, check: bool = True,
              extra_env: dict | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    """Run the real CLI as a subprocess: `python -m mbert_train.train`, or torchrun for nproc > 1."""
    cmd = command(nproc, [*FAST, f"run.dir={run_dir}", *_wandb_off(overrides)])
    proc = subprocess.run(cmd, env={**env(cache), **(extra_env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    return _check(proc) if check else proc


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            out[record["step"]] = record[key]
    return out


# The tiny run the truncated-checkpoint tests damage (each a copy of its own).
ONE_STEP = ["trainer.checkpoint_every=1", "trainer.eval_every=0", "trainer.export_hf=false", "data.num_workers=0",
            "logging.wandb_mode=disabled"]


STEPS = ["trainer.max_steps=20", "trainer.checkpoint_every=10", "trainer.eval_every=10"]
SECRET = "sekrit-wandb-key-123"

# The layout runs are compared across TP degrees, so they use TP-invariant attention-dropout
# masks (TP=2 drops exactly what TP=1 drops); other runs train with the default per-TP-rank
# streams.
INVARIANT = "model.tp_invariant_dropout=true"
LAYOUTS = {  # name: (processes, overrides)
    "tp1": (1, [INVARIANT]),
    "tp2": (2, ["parallel.tensor_parallel=2", INVARIANT]),
    "dp2_zero0": (2, ["parallel.zero_stage=0", INVARIANT]),
    "dp2_zero1": (2, ["parallel.zero_stage=1", INVARIANT]),
    "dp2_zero2": (2, ["parallel.zero_stage=2", INVARIANT]),
    "tp2_dp2_zero1": (4, ["parallel.tensor_parallel=2", "parallel.zero_stage=1", INVARIANT]),
}
