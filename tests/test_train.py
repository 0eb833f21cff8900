"""`mbert-train` end to end: layouts agree, loss falls, exact resume after SIGKILL, NaN handling,
artifacts (metrics, plot, W&B offline files, HF export), and one-line config errors."""

import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.dist import children
from tests.train_util import INVARIANT, LAYOUTS, SECRET, STEPS, losses, start, train


def _close(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys() and len(a) == 20
    for step in a:
        assert math.isclose(a[step], b[step], rel_tol=rtol), (step, a[step], b[step])


def _falls(run_dir: Path) -> None:
    curve = losses(run_dir)
    first, last = [curve[s] for s in range(1, 4)], [curve[s] for s in range(18, 21)]
    assert sum(last) / 3 < sum(first) / 3 - 0.5, curve


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_learns(runs, name):
    _falls(runs / name)


@pytest.mark.slow
def test_zero_stages_give_the_same_losses(runs):
    base = losses(runs / "dp2_zero0")
    _close(losses(runs / "dp2_zero1"), base, 1e-4)
    _close(losses(runs / "dp2_zero2"), base, 1e-4)


@pytest.mark.slow
def test_tensor_parallel_matches_tp1(runs):
    _close(losses(runs / "tp2"), losses(runs / "tp1"), 1e-4)
    _close(losses(runs / "tp2_dp2_zero1"), losses(runs / "dp2_zero1"), 1e-4)


@pytest.mark.slow
def test_tensor_parallel_grad_norm_matches_tp1(runs):
    """Step 1 (same weights, same batch): the reported gradient norm does not depend on TP, through
    our ZeRO-0 guard and through DeepSpeed's ZeRO-1 optimizer (replicated parameters counted once)."""
    for tp, base in (("tp2", "tp1"), ("tp2_dp2_zero1", "dp2_zero1")):
        got, want = losses(runs / tp, "grad_norm")[1], losses(runs / base, "grad_norm")[1]
        assert math.isclose(got, want, rel_tol=1e-5), (tp, got, want)


@pytest.mark.slow
def test_run_artifacts(runs):
    from transformers import MegatronBertForPreTraining

    run = runs / "tp1"
    records = [r for r in map(__import__("json").loads, (run / "metrics.jsonl").read_text().splitlines())]
    train_keys = {"step", "loss", "mlm_loss", "nsp_loss", "lr", "grad_norm", "tokens_per_s"}
    assert train_keys <= set(records[0])
    assert any("eval_mlm_loss" in r and "eval_nsp_accuracy" in r for r in records)
    # Evaluation and checkpoint time are logged apart and kept out of the training throughput.
    assert all(r["eval_s"] > 0 for r in records if "eval_mlm_loss" in r)
    assert [r["step"] for r in records if "checkpoint_s" in r] == [10, 20]
    assert (run / "curves.png").stat().st_size > 1000
    assert list((run / "wandb").glob("offline-run-*")), "W&B offline run files"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000020"
    model = MegatronBertForPreTraining.from_pretrained(run / "hf")
    assert model.config.hidden_size == 64
    for path in run.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"secret leaked into {path}"


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(runs, tmp_path, corpus_cache):
    """SIGKILL both ranks of a 2-process run after its first checkpoint; the rerun continues bit
    for bit."""
    run_dir = tmp_path / "killed"
    run = start(run_dir, corpus_cache, [*STEPS, *LAYOUTS["dp2_zero1"][1]], nproc=2)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and run.ranks.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    run.ranks.kill()
    killed = run.result()
    assert latest.read_text().strip() == "step_00000010", killed.stderr[-3000:]
    train(run_dir, corpus_cache, [*STEPS, *LAYOUTS["dp2_zero1"][1]], nproc=2)
    resumed, reference = losses(run_dir), losses(runs / "dp2_zero1")
    assert [resumed[s] for s in range(11, 21)] == [reference[s] for s in range(11, 21)]
    assert sorted(resumed) == list(range(1, 21)), "metrics.jsonl has each step once"


@pytest.mark.slow
def test_nan_step_is_skipped_and_counted(tmp_path, corpus_cache):
    run_dir = tmp_path / "nan"
    train(run_dir, corpus_cache, ["trainer.max_steps=8", "trainer.checkpoint_every=4", "trainer.eval_every=0",
                                  "trainer.inject_nan_at=[3]", "trainer.export_hf=false"])
    skipped = losses(run_dir, "skipped_steps")
    assert skipped[2] == 0 and skipped[3] == 1 and skipped[8] == 1
    assert all(math.isfinite(v) for s, v in losses(run_dir).items() if s != 3)


@pytest.mark.slow
def test_persistent_nan_stops_with_last_good_checkpoint(tmp_path, corpus_cache):
    run_dir = tmp_path / "diverged"
    proc = train(run_dir, corpus_cache, ["trainer.max_steps=20", "trainer.checkpoint_every=4",
                                         "trainer.eval_every=0", "trainer.max_bad_steps=3",
                                         "trainer.inject_nan_at=[6,7,8,9,10]"], check=False)
    assert proc.returncode != 0
    assert "consecutive non-finite steps" in proc.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    from mbert_train.checkpoint.dcp import read_full

    full = read_full(run_dir / "checkpoints" / "step_00000004", "param")
    assert all(torch.isfinite(t).all() for t in full.values())


@pytest.mark.parametrize("override, expected", [
    ("trainer.max_stepz=3", "trainer.max_stepz"),
    ("trainer.max_steps=many", "trainer.max_steps"),
    ("parallel.tensor_parallel=2", "parallel.tensor_parallel=2"),
    ("model.num_heads=3", "model.num_heads=3"),
    ("trainer.precision=fp16", "trainer.precision=fp16"),
    ("optim=lamb", "optim=lamb"),
    ("data.objective=none", "model.binary_head=false"),
    ("model.vocab_size=1000", "model.vocab_size=1000"),
])
def test_bad_config_fails_at_startup_with_one_line(tmp_path, corpus_cache, override, expected):
    proc = train(tmp_path / "bad", corpus_cache, [override], check=False, timeout=120)
    assert proc.returncode != 0
    first = proc.stderr.strip().splitlines()[0]
    assert expected in first, proc.stderr
    assert "Traceback" not in proc.stderr


def _copy_checkpoint(src_run: Path, dst_run: Path) -> None:
    import shutil

    shutil.copytree(src_run / "checkpoints", dst_run / "checkpoints")


@pytest.mark.slow
def test_incompatible_checkpoint_is_refused(runs, tmp_path, corpus_cache):
    _copy_checkpoint(runs / "tp1", tmp_path / "wider")
    proc = train(tmp_path / "wider", corpus_cache, [*STEPS, "model.hidden_size=128", "trainer.max_steps=30"],
                 check=False, timeout=120)
    assert proc.returncode != 0
    assert "model.hidden_size=128 (checkpoint: 64)" in proc.stderr.strip().splitlines()[0], proc.stderr


@pytest.mark.slow
def test_tp_change_resumes_by_resharding_and_init_from_keeps_weights(runs, tmp_path, corpus_cache):
    _copy_checkpoint(runs / "tp1", tmp_path / "tp_change")
    proc = train(tmp_path / "tp_change", corpus_cache, [*STEPS, "parallel.tensor_parallel=2", "trainer.max_steps=22",
                                                        "trainer.eval_every=0", "trainer.export_hf=false"],
                 nproc=2, timeout=300)
    assert ("[mbert-train] resharding checkpoint step_00000020 from TP1xDP1 ZeRO-0 to TP2xDP1 ZeRO-0"
            in proc.stdout), proc.stdout
    assert "resumed at step 20" in proc.stdout
    # Dropout streams differ after a TP change; the continuation stays on the curve.
    assert abs(losses(tmp_path / "tp_change")[21] - losses(runs / "tp1")[20]) < 0.5
    start = runs / "tp1" / "checkpoints" / "step_00000020"
    train(tmp_path / "from_tp1", corpus_cache, [f"trainer.init_from={start}", "parallel.tensor_parallel=2",
                                                "trainer.max_steps=2", "trainer.eval_every=0",
                                                "trainer.export_hf=false"], nproc=2)
    # Continuing from step-20 weights: far below the loss of a fresh model (about 9.7).
    assert losses(tmp_path / "from_tp1")[1] < losses(runs / "tp1")[1] - 0.5


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path, corpus_cache):
    """SIGTERM to the trainer and its DataLoader workers (as to their process group): the
    workers leave the stop to the trainer, which checkpoints its last step and exits 0."""
    run_dir = tmp_path / "preempted"
    run = start(run_dir, corpus_cache, ["trainer.max_steps=100000", "trainer.checkpoint_every=100000",
                                        "trainer.eval_every=0"])
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 200
    while run.ranks.poll() is None and time.time() < deadline and (
            not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    (trainer,) = run.ranks.pids
    workers = children(trainer)
    assert workers, "no DataLoader worker found"
    for pid in [trainer, *workers]:
        os.kill(pid, signal.SIGTERM)
    proc = run.result(timeout=120)
    assert proc.returncode == 0, proc.stderr
    step = int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert step >= 3 and f"checkpoint written at step {step}" in proc.stdout
    assert "DataLoader worker" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_sequence_parallel_trains_like_tp2_and_tp1_and_resumes_exactly(runs, tmp_path, corpus_cache):
    """TP-invariant masks: SP drops exactly what TP=2 and TP=1 drop, dropout on, 20 steps."""
    import shutil

    sp = tmp_path / "sp"
    overrides = [*STEPS, "parallel.tensor_parallel=2", "parallel.sequence_parallel=true", INVARIANT]
    proc = train(sp, corpus_cache, overrides, nproc=2)
    assert "ZeRO-0 + SP" in proc.stdout
    _close(losses(sp), losses(runs / "tp2"), 1e-4)
    _close(losses(sp), losses(runs / "tp1"), 1e-4)
    # The LayerNorm gradients, summed over TP in backward, count once in the clipped norm.
    _close(losses(sp, "grad_norm"), losses(runs / "tp2", "grad_norm"), 1e-4)
    # Restarted from its step-10 checkpoint, as after a SIGKILL: bit-identical.
    again = tmp_path / "sp_again"
    shutil.copytree(sp, again)
    shutil.rmtree(again / "checkpoints" / "step_00000020")
    (again / "checkpoints" / "latest").write_text("step_00000010\n")
    train(again, corpus_cache, overrides, nproc=2)
    assert losses(again) == losses(sp)
