"""`trainer.resume=auto|none|STEP` and `trainer.eval_only=true`, trained in-process on forked
gloo ranks (the process boundary proves nothing here; the CLI's own plumbing is tested in
test_train.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.dist import spawn
from tests.train_util import FAST, losses

RUN = [*FAST, "data.num_workers=0", "trainer.max_steps=6", "trainer.checkpoint_every=2", "trainer.eval_every=6",
       "trainer.export_hf=false", "logging.wandb_mode=disabled"]


def _train(run_dir: Path, overrides: list[str], out: Path) -> None:
    import contextlib
    import torch.distributed as dist

    from mbert_train.config import compose_config
    from mbert_train.train import run

    cfg = compose_config([*RUN, f"run.dir={run_dir}", *overrides])
    # The forked ranks write to the forkserver's stdout, which no capture fixture sees.
    with open(out.with_suffix(f".rank{dist.get_rank()}"), "w") as f, contextlib.redirect_stdout(f):
        run(cfg, str(run_dir))


def train(run_dir: Path, overrides: list[str], world: int = 1) -> str:
    """Train (or evaluate) in `run_dir`; rank 0's stdout."""
    out = run_dir.parent / f"{run_dir.name}.stdout"
    spawn(_train, world, run_dir, overrides, out)
    return out.with_suffix(".rank0").read_text()


def failure(run_dir: Path, overrides: list[str]) -> str:
    """The last line of the error a start raises (its one-line message)."""
    with pytest.raises(AssertionError) as info:
        train(run_dir, overrides)
    return str(info.value).strip().splitlines()[-1]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory, corpus_cache) -> Path:
    """A fresh 6-step run (checkpoints at 2, 4, 6; evaluated at 6) started with trainer.resume=none."""
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    train(run_dir, ["trainer.resume=none"])
    return run_dir


def steps_in(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))


def test_resume_step_continues_bit_identically_and_sets_later_checkpoints_aside(six_steps, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(six_steps, run_dir)
    out = train(run_dir, ["trainer.resume=2"])
    assert "resumed at step 2 (trainer.resume=2; later checkpoints moved to" in out
    assert losses(run_dir) == losses(six_steps)  # bit for bit, steps 3-6 retrained
    assert [r["step"] for r in records(run_dir)] == [r["step"] for r in records(six_steps)]  # no duplicates
    root = run_dir / "checkpoints"
    (aside,) = root.glob("set_aside_*")
    assert str(aside) in out
    assert steps_in(aside) == ["step_00000004", "step_00000006"]  # moved whole, not deleted
    for step in steps_in(aside):
        assert {p.name for p in (aside / step).iterdir()} == {p.name for p in (six_steps / "checkpoints" / step).iterdir()}
    assert steps_in(root) == ["step_00000002", "step_00000004", "step_00000006"]  # rewritten by the rerun
    assert (root / "latest").read_text().strip() == "step_00000006"


def test_resume_none_refuses_a_run_with_checkpoints(six_steps, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(six_steps, run_dir)
    line = failure(run_dir, ["trainer.resume=none"])
    assert "trainer.resume=none" in line and "steps 2, 4, 6" in line and "new folder" in line
    assert steps_in(run_dir / "checkpoints") == steps_in(six_steps / "checkpoints")
    assert records(run_dir) == records(six_steps)  # nothing cut, nothing written


def test_resume_to_a_missing_step_names_those_that_exist(six_steps, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(six_steps, run_dir)
    line = failure(run_dir, ["trainer.resume=3"])
    assert "trainer.resume=3" in line and "its steps: 2, 4, 6" in line
    assert not list((run_dir / "checkpoints").glob("set_aside_*"))


@pytest.mark.parametrize("value", ["latest", "-1", "2.5"])
def test_resume_setting_is_checked_at_compose(value):
    from mbert_train.config import compose_config

    with pytest.raises(ValueError, match=f"trainer.resume={value} must be auto, none or a checkpoint's step"):
        compose_config([f"trainer.resume={value}"])


def _eval_record(run_dir: Path) -> dict:
    last = records(run_dir)[-1]
    assert set(last) >= {"eval_mlm_loss", "eval_mlm_accuracy", "eval_nsp_accuracy"}
    return last


@pytest.mark.slow
def test_eval_only_at_tp1_and_tp2_and_from_init_from(six_steps, tmp_path):
    before = {p.name for p in (six_steps / "checkpoints").iterdir()}
    results = {}
    for name, world, overrides in (("tp1", 1, []), ("tp2", 2, ["parallel.tensor_parallel=2"])):
        run_dir = tmp_path / name
        shutil.copytree(six_steps, run_dir)
        out = train(run_dir, ["trainer.eval_only=true", *overrides], world=world)
        assert "eval at step 6: eval_mlm_loss=" in out
        assert records(run_dir)[:-1] == records(six_steps)  # appended, nothing cut
        results[name] = _eval_record(run_dir)
        assert results[name]["step"] == 6
        assert {p.name for p in (run_dir / "checkpoints").iterdir()} == before  # no checkpoint written
        assert not (run_dir / "hf").exists()
    fresh = tmp_path / "fresh"
    train(fresh, ["trainer.eval_only=true", f"trainer.init_from={six_steps / 'checkpoints' / 'step_00000006'}"])
    results["init_from"] = _eval_record(fresh)
    assert not (fresh / "checkpoints").exists()
    trained = next(r for r in records(six_steps) if "eval_mlm_loss" in r)  # the training run's own, step 6
    for name in ("tp1", "tp2", "init_from"):
        for key in ("eval_mlm_loss", "eval_mlm_accuracy", "eval_nsp_accuracy"):
            assert results[name][key] == pytest.approx(trained[key], rel=1e-5, abs=1e-6), (name, key)


def test_eval_only_with_nothing_to_evaluate_is_one_line(tmp_path, corpus_cache):
    line = failure(tmp_path / "empty", ["trainer.eval_only=true"])
    assert "trainer.eval_only=true found no checkpoint" in line and "trainer.init_from" in line
