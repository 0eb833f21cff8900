"""logging.tensorboard: event files hold what metrics.jsonl holds, a resume leaves one value per
step, it works with W&B off, and a missing package is one line at start-up."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from mbert_train.config import compose_config
from mbert_train.errors import UserError
from mbert_train.metrics import TENSORBOARD_DIR, MetricsLogger, tensorboard_tag
from tests.train_util import train


def _logger(run_dir: Path, **kwargs) -> MetricsLogger:
    kwargs = {"rank": 0, "wandb_mode": "disabled", "tensorboard": True, **kwargs}
    return MetricsLogger(run_dir, project="p", run_name=None, config={}, wandb_run_id=None, **kwargs)


def _log_steps(logger: MetricsLogger, steps: range, *, offset: float = 0.0, eval_at: tuple = ()) -> None:
    """Records shaped like the trainer's: None where a value is unknown (nsp_loss, MFU on CPU)."""
    for step in steps:
        if step == steps.start:
            logger.log(step, {"compile_s": 1.5})
        logger.log(step, {"loss": offset + 3.0 / step, "mlm_loss": offset + 2.5 / step, "nsp_loss": None,
                          "lr": 1e-4 * step, "grad_norm": 0.5 + step, "tokens_per_s": 1000.0 * step,
                          "skipped_steps": 0, "mfu": None, "memory_gib": None})
        if step in eval_at:
            logger.log(step, {"eval_mlm_loss": offset + 4.0 / step, "eval_mlm_accuracy": 0.1 * step,
                              "eval_s": 0.25})
            logger.log(step, {"checkpoint_s": 0.75})


def jsonl_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every numeric field of metrics.jsonl by TensorBoard tag: [(step, value), ...]."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key not in ("step", "time") and isinstance(value, (int, float)):
                out.setdefault(tensorboard_tag(key), []).append((record["step"], value))
    return out


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows: the event files read back by its own loader, purges applied."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_same(tensorboard: dict, jsonl: dict) -> None:
    assert sorted(tensorboard) == sorted(jsonl)
    for tag, points in jsonl.items():
        assert [s for s, _ in tensorboard[tag]] == [s for s, _ in points], tag
        assert [v for _, v in tensorboard[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag


def test_tags():
    assert [tensorboard_tag(k) for k in ("loss", "tokens_per_s", "eval_mlm_loss", "eval_s", "checkpoint_s")] == [
        "train/loss", "train/tokens_per_s", "eval/mlm_loss", "time/eval_s", "time/checkpoint_s"]


def test_event_files_hold_what_metrics_jsonl_holds(tmp_path):
    logger = _logger(tmp_path)
    _log_steps(logger, range(1, 5), eval_at=(2, 4))
    logger.finish()
    logger.finish()
    jsonl = jsonl_scalars(tmp_path)
    assert {"train/loss", "train/lr", "eval/mlm_loss", "time/eval_s", "time/compile_s"} <= set(jsonl)
    assert "train/nsp_loss" not in jsonl and "train/mfu" not in jsonl  # None is not a value
    assert_same(tensorboard_scalars(tmp_path), jsonl)


def test_resume_shows_one_value_per_step(tmp_path):
    # The first run logged to step 6 (eval at 5) and died without closing its writer; its last
    # checkpoint was step 3. The resumed run logs 4..8 with other values (eval at 6 only).
    first = _logger(tmp_path)
    _log_steps(first, range(1, 7), eval_at=(3, 5))
    # TensorBoard reads event files in name order, and names start with the second they were
    # opened in: a real resume starts seconds later (in another process).
    time.sleep(1.01 - time.time() % 1)
    resumed = _logger(tmp_path, resume_step=3)
    _log_steps(resumed, range(4, 9), offset=100.0, eval_at=(6,))
    resumed.finish()
    first.finish()
    shown = tensorboard_scalars(tmp_path)
    assert [s for s, _ in shown["train/loss"]] == list(range(1, 9))
    assert [v for s, v in shown["train/loss"] if s > 3] == pytest.approx([100.0 + 3.0 / s for s in range(4, 9)])
    assert [s for s, _ in shown["eval/mlm_loss"]] == [3, 6]  # the first run's step 5 is gone
    assert_same(shown, jsonl_scalars(tmp_path))


def test_independent_of_wandb_and_off_by_default(tmp_path):
    logger = _logger(tmp_path / "tb")
    _log_steps(logger, range(1, 3))
    logger.finish()
    assert (tmp_path / "tb" / TENSORBOARD_DIR).is_dir() and not (tmp_path / "tb" / "wandb").exists()
    for name, kwargs in {"off": {"tensorboard": False}, "rank1": {"rank": 1}}.items():
        logger = _logger(tmp_path / name, **kwargs)
        _log_steps(logger, range(1, 3))
        logger.finish()
        assert not (tmp_path / name / TENSORBOARD_DIR).exists(), name
    assert compose_config([]).logging.tensorboard is False


@pytest.fixture
def no_tensorboard(monkeypatch):
    """`import tensorboard` fails, as where the package is not installed."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    for name in [m for m in sys.modules if m.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)


def _assert_one_line(exc_info) -> None:
    text = str(exc_info.value)
    assert "\n" not in text and "logging.tensorboard" in text and "pip install tensorboard" in text, text


def test_missing_package_is_one_line_before_any_work(tmp_path, monkeypatch, no_tensorboard):
    import mbert_train.parallel.layout
    from mbert_train.train import run

    def started(*args, **kwargs):
        raise AssertionError("training started before the tensorboard check")

    monkeypatch.setattr(mbert_train.parallel.layout, "init_parallel", started)
    with pytest.raises(UserError) as exc:
        run(compose_config(["logging.tensorboard=true", "logging.wandb_mode=disabled"]), str(tmp_path / "run"))
    _assert_one_line(exc)
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError) as exc:
        _logger(tmp_path / "direct")
    _assert_one_line(exc)
    _logger(tmp_path / "off", tensorboard=False).finish()  # no import when off


@pytest.mark.slow
def test_training_run_with_wandb_off(tmp_path, corpus_cache):
    run_dir = tmp_path / "run"
    train(run_dir, corpus_cache, ["trainer.max_steps=4", "trainer.eval_every=2", "trainer.checkpoint_every=2",
                                  "trainer.export_hf=false", "logging.wandb_mode=disabled",
                                  "logging.tensorboard=true"])
    jsonl = jsonl_scalars(run_dir)
    assert {"train/loss", "train/mlm_loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
            "eval/mlm_loss", "time/checkpoint_s"} <= set(jsonl)
    assert_same(tensorboard_scalars(run_dir), jsonl)
    assert not (run_dir / "wandb").exists()
