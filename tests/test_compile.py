"""`trainer.compile=true` end to end: compiled layers give the eager losses (TP=1, and TP=2 with
activation checkpointing and ZeRO-1), a compiled run restarted from a checkpoint resumes bit for
bit, and a machine without a C++ compiler is refused in one line.

MLM-only batches are full-length windows without padding, so every step has one shape and each
run compiles one layer graph; inductor's on-disk cache makes reruns of the suite cheap."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from tests.train_util import losses, train, train_cli

pytestmark = pytest.mark.slow

ONE_SHAPE = ["data.objective=none", "model.binary_head=false", "trainer.eval_every=0", "trainer.export_hf=false",
             "logging.wandb_mode=disabled"]
NO_DROPOUT = ["model.hidden_dropout=0", "model.attention_dropout=0"]
STEPS = ["trainer.max_steps=3"]
COMPILE = ["trainer.compile=true"]
TP2 = ["parallel.tensor_parallel=2", "parallel.zero_stage=1", "trainer.activation_checkpointing=true"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, corpus_cache) -> dict[str, tuple[Path, Path]]:
    """(eager, compiled) run dirs at TP=1 and at TP=2, dropout 0."""
    root = tmp_path_factory.mktemp("compile")
    out = {}
    for name, nproc, extra in (("tp1", 1, []), ("tp2", 2, TP2)):
        for mode, flags in (("eager", []), ("compiled", COMPILE)):
            train(root / f"{name}_{mode}", corpus_cache, [*ONE_SHAPE, *NO_DROPOUT, *STEPS, *extra, *flags],
                  nproc=nproc)
        out[name] = (root / f"{name}_eager", root / f"{name}_compiled")
    return out


@pytest.mark.parametrize("name", ["tp1", "tp2"])
def test_compiled_losses_match_eager(pairs, name):
    eager, compiled = (losses(run) for run in pairs[name])
    assert sorted(eager) == sorted(compiled) == [1, 2, 3]
    for step in eager:
        assert abs(eager[step] - compiled[step]) < 1e-5, (name, step, eager[step], compiled[step])
    # Training moved the weights: step 3 is not step 1's loss again.
    assert abs(compiled[3] - compiled[1]) > 1e-3


@pytest.mark.parametrize("name", ["tp1", "tp2"])
def test_warm_up_is_logged(pairs, name):
    records = losses(pairs[name][1], "compile_s")
    assert list(records) == [1] and math.isfinite(records[1]) and records[1] > 0
    assert not losses(pairs[name][0], "compile_s"), "no compile_s without trainer.compile"


def test_compiled_run_resumes_exactly(tmp_path, corpus_cache):
    """Dropout 0.1 (the mask drawn inside the compiled graph) and activation checkpointing on.
    Restarted in a new process from its step-2 checkpoint, as after a SIGKILL (test_train.py
    kills a run for real), it continues bit for bit."""
    overrides = [*ONE_SHAPE, *COMPILE, "trainer.activation_checkpointing=true", "trainer.max_steps=4",
                 "trainer.checkpoint_every=2"]
    whole = tmp_path / "whole"
    train(whole, corpus_cache, overrides)
    run_dir = tmp_path / "restarted"
    shutil.copytree(whole, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000004")
    (run_dir / "checkpoints" / "latest").write_text("step_00000002\n")
    train(run_dir, corpus_cache, overrides)
    resumed, reference = losses(run_dir), losses(whole)
    assert sorted(resumed) == sorted(reference) == [1, 2, 3, 4]
    assert [resumed[s] for s in (3, 4)] == [reference[s] for s in (3, 4)]
    assert list(losses(run_dir, "compile_s")) == [1, 3], "each process logs its own warm-up"


def test_missing_compiler_is_one_line(tmp_path, corpus_cache):
    # A new interpreter: inductor reads $CXX when it is imported.
    proc = train_cli(tmp_path / "nocc", corpus_cache, [*ONE_SHAPE, *COMPILE, *STEPS], check=False, timeout=120,
                     extra_env={"CXX": str(tmp_path / "no-such-c++")})
    assert proc.returncode != 0
    first = proc.stderr.strip().splitlines()[0]
    assert "trainer.compile=true needs a C++ compiler" in first and "trainer.compile=false" in first, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "nocc" / "metrics.jsonl").exists(), "refused before any training"
