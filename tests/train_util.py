"""Launch the real CLIs (`mbert-train`, `torchrun -m mbert_train.train`) as subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Small enough for 2 CPU cores; dropout stays on so exact-resume covers the RNG state.
FAST = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.intermediate_size=128",
        "data.max_seq_length=64", "trainer.micro_batch_size=8", "trainer.log_every=1", "optim.warmup_steps=5",
        "logging.progress_bar=false", "data.num_workers=1", "trainer.eval_batches=2"]


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


def train(run_dir: Path, cache: str, overrides: list[str], *, nproc: int = 1, check: bool = True,
          extra_env: dict | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    """Run mbert-train; W&B is off (3 s of every start-up) unless `overrides` set logging.*
    themselves, as the tests that check W&B's files do."""
    if not any(o.startswith(("logging.wandb_mode=", "logging=")) for o in overrides):
        overrides = [*overrides, "logging.wandb_mode=disabled"]
    cmd = command(nproc, [*FAST, f"run.dir={run_dir}", *overrides])
    proc = subprocess.run(cmd, env={**env(cache), **(extra_env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        # Every rank's final error line first: the tail alone often shows only a peer's reaction.
        errors = "\n".join(line for line in proc.stderr.splitlines() if "Error:" in line or "error:" in line)
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{errors}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


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
