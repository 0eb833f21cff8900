"""Checkpoint directory protocol: atomic commit, `latest`, rotation, crash recovery (a kill at
every step of a save), one-line errors, ranks that fail together, loaders, and the RNG state the
trainer stores in checkpoints."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mbert_train.checkpoint import CheckpointDir, CheckpointError, read_meta, step_of, step_tag, write_errors
from mbert_train.checkpoint.state import Checkpointer, checked_scalars
from mbert_train.config import TrainConfig
from mbert_train.errors import UserError
from mbert_train.rng import capture_rng_state, restore_rng_state
from mbert_train.trainer import Trainer, TrainingDiverged
from tests.dist import spawn
from tests.train_util import ONE_STEP, Forked, train


def load_torch(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _save(ckpt: CheckpointDir, step: int, value: float | None = None) -> Path:
    tmp = ckpt.begin(step)
    torch.save({"w": torch.full((4,), float(step if value is None else value))}, tmp / "model.pt")
    return ckpt.commit(step, layout={"world_size": 1, "tensor_parallel": 1})


def test_tags_sort_by_step():
    assert step_tag(100) == "step_00000100"
    assert step_of("/x/step_00000100") == 100
    tags = [step_tag(s) for s in (9, 10, 100, 99)]
    assert sorted(tags) == [step_tag(s) for s in (9, 10, 99, 100)]
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        step_of("latest")


def test_commit_renames_writes_meta_and_latest(tmp_path):
    ckpt = CheckpointDir(tmp_path)
    assert ckpt.latest() is None and ckpt.list() == []
    tmp = ckpt.begin(100)
    assert tmp == tmp_path / "checkpoints" / ".tmp-step_00000100" and tmp.is_dir()
    torch.save({"w": torch.ones(2)}, tmp / "model.pt")
    final = ckpt.commit(100, layout={"world_size": 8, "tensor_parallel": 2})
    assert final == tmp_path / "checkpoints" / "step_00000100"
    assert not tmp.exists()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000100"
    meta = read_meta(final)
    assert meta["step"] == 100 and meta["layout"] == {"world_size": 8, "tensor_parallel": 2}
    assert ckpt.latest() == final
    assert torch.equal(load_torch(final / "model.pt")["w"], torch.ones(2))


def test_keep_last_rotation(tmp_path):
    ckpt = CheckpointDir(tmp_path, keep_last=2)
    for step in (100, 200, 300, 400):
        _save(ckpt, step)
    assert [step_of(p) for p in ckpt.list()] == [300, 400]
    assert step_of(ckpt.latest()) == 400
    keep_all = CheckpointDir(tmp_path, keep_last=None)
    _save(keep_all, 500)
    assert [step_of(p) for p in keep_all.list()] == [300, 400, 500]
    with pytest.raises(ValueError, match="keep_last=0"):
        CheckpointDir(tmp_path, keep_last=0)


def test_stale_tmp_dirs_are_ignored_and_collected(tmp_path, caplog):
    ckpt = CheckpointDir(tmp_path)
    _save(ckpt, 100)
    stale = tmp_path / "checkpoints" / ".tmp-step_00000200"
    stale.mkdir()
    (stale / "model.pt").write_bytes(b"half a file")
    stray_latest = tmp_path / "checkpoints" / ".tmp-latest.abc123"
    stray_latest.write_text("step_00000200")
    assert [step_of(p) for p in ckpt.list()] == [100]
    # Other ranks only read: they see the right checkpoint and leave the files alone.
    assert step_of(CheckpointDir(tmp_path, rank=1).latest()) == 100
    assert stale.exists()
    with caplog.at_level(logging.WARNING, logger="mbert_train.checkpoint"):
        assert step_of(ckpt.latest()) == 100
    assert not stale.exists() and not stray_latest.exists()
    assert "crashed save" in caplog.text


def test_latest_naming_missing_dir_falls_back_to_newest(tmp_path, caplog):
    ckpt = CheckpointDir(tmp_path, keep_last=None)
    for step in (100, 200, 300):
        _save(ckpt, step)
    shutil.rmtree(ckpt.path(300))
    with caplog.at_level(logging.WARNING, logger="mbert_train.checkpoint"):
        assert step_of(ckpt.latest()) == 200
    assert "step_00000300" in caplog.text and "falling back" in caplog.text


def test_missing_latest_file_falls_back(tmp_path, caplog):
    ckpt = CheckpointDir(tmp_path)
    _save(ckpt, 100)
    (tmp_path / "checkpoints" / "latest").unlink()
    with caplog.at_level(logging.WARNING, logger="mbert_train.checkpoint"):
        assert step_of(ckpt.latest()) == 100
    assert "is missing" in caplog.text


def test_recommit_same_step_replaces_it(tmp_path):
    ckpt = CheckpointDir(tmp_path)
    _save(ckpt, 100, value=1.0)
    _save(ckpt, 100, value=2.0)
    assert [p.name for p in ckpt.list()] == ["step_00000100"]
    assert load_torch(ckpt.latest() / "model.pt")["w"][0].item() == 2.0
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_nonzero_ranks_do_not_touch_the_directory(tmp_path):
    other = CheckpointDir(tmp_path, rank=1)
    tmp = other.begin(100)
    assert tmp == CheckpointDir(tmp_path).tmp_path(100) and not tmp.exists()
    leader = CheckpointDir(tmp_path)
    leader.begin(100)
    (tmp / "model_tp1.pt").write_bytes(b"rank 1 shard")
    assert other.commit(100) == leader.path(100) and tmp.exists()
    leader.commit(100)
    assert (leader.path(100) / "model_tp1.pt").read_bytes() == b"rank 1 shard"
    with pytest.raises(CheckpointError, match="call begin"):
        leader.commit(200)


def test_truncated_or_foreign_state_blobs_give_one_line_errors(tmp_path):
    from mbert_train.checkpoint.state import _read_rng, _read_scalars

    buffer = io.BytesIO()
    torch.save(capture_rng_state(), buffer)
    blob = buffer.getvalue()
    assert _read_rng(blob, tmp_path).keys() == capture_rng_state().keys()
    with pytest.raises(CheckpointError) as info:
        _read_rng(blob[: len(blob) // 2], tmp_path)
    assert str(info.value) == (f"checkpoint {tmp_path}: its RNG state is truncated or corrupt (ValueError); "
                               "delete the checkpoint dir or point run.dir elsewhere")
    buffer = io.BytesIO()
    torch.save({"x": SimpleNamespace(a=1)}, buffer)
    with pytest.raises(CheckpointError, match="holds types.SimpleNamespace in its RNG state"):
        _read_rng(buffer.getvalue(), tmp_path)
    # Refused even where another library allowed it process-wide (megatron.core does on import).
    widened = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([SimpleNamespace])
    try:
        with pytest.raises(CheckpointError, match="holds types.SimpleNamespace in its RNG state"):
            _read_rng(buffer.getvalue(), tmp_path)
        assert SimpleNamespace in torch.serialization.get_safe_globals()  # given back as it was
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(widened)
    with pytest.raises(CheckpointError, match="its scalars are truncated or corrupt"):
        _read_scalars(b'{"step": 1', tmp_path)
    assert "\n" not in str(info.value)


# The child saves step 100, then starts step 200 and announces "PAUSED" from inside the
# chosen phase, where it sleeps until SIGKILLed: during a file write, just before the
# directory rename, or after the rename but before `latest` is replaced.
_CHILD = textwrap.dedent("""
    import os, sys, time, torch
    from mbert_train import checkpoint as ck
    run_dir, phase = sys.argv[1], sys.argv[2]

    def pause():
        print("PAUSED", flush=True)
        time.sleep(120)

    ckpt = ck.CheckpointDir(run_dir, keep_last=1)
    tmp = ckpt.begin(100)
    torch.save({"w": torch.full((4,), 100.0)}, tmp / "model.pt")
    ckpt.commit(100)
    tmp = ckpt.begin(200)
    if phase == "write":
        with open(tmp / "model.pt", "wb") as f:
            f.write(b"PK\\x03\\x04 half written")
            f.flush()
            pause()
    torch.save({"w": torch.full((4,), 200.0)}, tmp / "model.pt")
    real_rename, real_replace = os.rename, os.replace
    if phase == "rename":
        os.rename = lambda *a: (pause(), real_rename(*a))
    if phase == "latest":
        os.replace = lambda *a: (pause(), real_replace(*a))
    ckpt.commit(200)
    print("DONE", flush=True)
""")


@pytest.mark.parametrize("phase", ["write", "rename", "latest"])
def test_sigkill_mid_save_keeps_previous_checkpoint(tmp_path, phase):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    child = Forked(str(script), [str(tmp_path), phase], {**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 120
        while child.output("out").strip() != "PAUSED":
            assert child.ranks.poll() is None and time.monotonic() < deadline, child.output("err")[-3000:]
            time.sleep(0.02)
        os.kill(child.ranks.pids[0], signal.SIGKILL)
        done = child.result(timeout=30)
    finally:
        child.ranks.kill()
    assert done.returncode == -signal.SIGKILL
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000100"
    ckpt = CheckpointDir(tmp_path, keep_last=1)
    resume = ckpt.latest()
    assert resume == ckpt.path(100)
    assert load_torch(resume / "model.pt")["w"][0].item() == 100.0
    assert json.loads((resume / "meta.json").read_text())["step"] == 100
    assert not list(root.glob(".tmp-*"))
    # The run goes on: the next save of step 200 succeeds and rotation drops step 100.
    _save(ckpt, 200)
    assert [p.name for p in ckpt.list()] == ["step_00000200"]


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    _seed(1234)
    # Leave a cached Gaussian in both generators: it is part of their state too.
    random.gauss(0, 1)
    np.random.randn()
    torch.save({"rng": capture_rng_state()}, tmp_path / "rng.pt")

    def draw():
        return (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(),
                torch.rand(3).tolist())

    expected = draw()
    restore_rng_state(load_torch(tmp_path / "rng.pt")["rng"])
    assert draw() == expected
    _seed(1234)
    first = draw()
    _seed(1234)
    assert draw() == first


# ---- kills injected at each step of commit, rotation and same-step re-commit ---------------
class _Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs, no `except Exception` handler catches it."""


def _kill_at(m: pytest.MonkeyPatch, n: int) -> None:
    """Die at the n-th rename / replace / rmtree (counted together); a dying rmtree first
    deletes one file that is not meta.json, as a kill in the middle of it would."""
    real = {"rename": os.rename, "replace": os.replace, "rmtree": shutil.rmtree}
    count = [0]

    def wrap(name):
        def op(path, *args, **kwargs):
            count[0] += 1
            if count[0] == n:
                if name == "rmtree":
                    next(p for p in sorted(Path(path).iterdir()) if p.name != "meta.json").unlink()
                raise _Killed
            return real[name](path, *args, **kwargs)
        return op

    m.setattr(os, "rename", wrap("rename"))
    m.setattr(os, "replace", wrap("replace"))
    m.setattr(shutil, "rmtree", wrap("rmtree"))


def _assert_whole(ckpt: CheckpointDir) -> None:
    for path in ckpt.list():
        assert load_torch(path / "model.pt")["w"][0].item() in (step_of(path), 1.0, 2.0), path
        assert read_meta(path)["step"] == step_of(path)


def _each_kill(monkeypatch, run_dir: Path, save) -> int:
    """Call `save` with a kill injected at the 1st, 2nd, ... file operation, each time on a fresh
    copy of `run_dir`; yield each killed copy, until a save runs to its end."""
    for n in range(1, 20):
        copy = run_dir.parent / f"killed_at_{n}"
        shutil.copytree(run_dir, copy)
        with monkeypatch.context() as m:
            _kill_at(m, n)
            try:
                save(copy)
            except _Killed:
                yield copy
                continue
        return


def test_kill_during_commit_and_rotation_never_loses_the_newest(tmp_path, monkeypatch):
    run = tmp_path / "run"
    ckpt = CheckpointDir(run, keep_last=2)
    for step in (100, 200):
        _save(ckpt, step)
    points = 0
    for copy in _each_kill(monkeypatch, run, lambda d: _save(CheckpointDir(d, keep_last=2), 300)):
        points += 1
        renamed = CheckpointDir(copy).path(300).exists()
        fresh = CheckpointDir(copy, keep_last=2)
        got = fresh.latest()
        assert step_of(got) in ((200, 300) if renamed else (200,))
        _assert_whole(fresh)
        steps = [step_of(p) for p in fresh.list()]
        assert 200 in steps and (300 in steps) == renamed
        assert not [p for p in fresh.root.iterdir() if p.name.startswith(".")]
        _save(fresh, 400)
        assert [step_of(p) for p in fresh.list()][-1] == 400 and len(fresh.list()) == 2
    assert points >= 5  # meta.json, the rename, latest, the rotation's rename and its delete


def test_kill_during_same_step_recommit_keeps_a_complete_copy(tmp_path, monkeypatch):
    run = tmp_path / "run"
    ckpt = CheckpointDir(run, keep_last=2)
    _save(ckpt, 100)
    _save(ckpt, 200, value=1.0)
    points = 0
    for copy in _each_kill(monkeypatch, run, lambda d: _save(CheckpointDir(d, keep_last=2), 200, value=2.0)):
        points += 1
        root = copy / "checkpoints"
        final = root / "step_00000200"
        if final.is_dir():  # a copy of step 200 is committed: it stays
            expected = load_torch(final / "model.pt")["w"][0].item()
        else:  # killed between the two renames: the newer complete copy comes back
            expected = 2.0 if (root / ".tmp-step_00000200" / "meta.json").is_file() else 1.0
        fresh = CheckpointDir(copy, keep_last=2)
        got = fresh.latest()
        assert got == final
        assert load_torch(got / "model.pt")["w"][0].item() == expected
        _assert_whole(fresh)
        assert [step_of(p) for p in fresh.list()] == [100, 200]
        assert not [p for p in root.iterdir() if p.name.startswith(".")]
    assert points >= 4  # meta.json, old copy aside, new copy in place, delete the old copy


def test_interrupted_recommit_restores_the_only_complete_copy(tmp_path):
    ckpt = CheckpointDir(tmp_path)
    _save(ckpt, 100)
    _save(ckpt, 200, value=1.0)
    root = tmp_path / "checkpoints"
    # Killed between the renames, before the new copy had its meta.json: only the old is complete.
    os.rename(root / "step_00000200", root / ".tmp-replaced-step_00000200-12345")
    (root / ".tmp-step_00000200").mkdir()
    (root / ".tmp-step_00000200" / "model.pt").write_bytes(b"half")
    assert load_torch(ckpt.latest() / "model.pt")["w"][0].item() == 1.0
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000100", "step_00000200"]


def test_replace_keeps_the_order_and_latest_and_survives_a_kill_between_its_renames(tmp_path, monkeypatch):
    ckpt = CheckpointDir(tmp_path, keep_last=None)
    _save(ckpt, 100)
    _save(ckpt, 200)
    root = tmp_path / "checkpoints"
    commit = read_meta(ckpt.path(100))["commit"]
    tmp = ckpt.begin(100)
    torch.save({"w": torch.full((4,), 7.0)}, tmp / "model.pt")
    ckpt.replace(100, layout={"tensor_parallel": 1}, files=None, record={"model": {"x": 1}})
    meta = read_meta(ckpt.path(100))
    assert meta["commit"] == commit and meta["model"] == {"x": 1} and meta["format"] == 3
    assert (root / "latest").read_text().strip() == "step_00000200" and ckpt.latest() == ckpt.path(200)
    assert [p.name for p in ckpt.list()] == ["step_00000100", "step_00000200"]
    # Killed between its two renames: the rewritten copy (same commit) wins over the original.
    tmp = ckpt.begin(100)
    torch.save({"w": torch.full((4,), 8.0)}, tmp / "model.pt")
    real_rename = os.rename

    def die_after_first(src, dst):
        real_rename(src, dst)
        if ".tmp-replaced-" in str(dst):
            raise KeyboardInterrupt
    monkeypatch.setattr(os, "rename", die_after_first)
    with pytest.raises(KeyboardInterrupt):
        ckpt.replace(100, layout={}, files=None, record={})
    monkeypatch.undo()
    assert not ckpt.path(100).exists()
    ckpt.collect_garbage()
    assert load_torch(ckpt.path(100) / "model.pt")["w"][0].item() == 8.0
    assert read_meta(ckpt.path(100))["commit"] == commit
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000100", "step_00000200"]


def test_rotation_and_fallback_follow_the_order_checkpoints_were_written(tmp_path, caplog):
    keep_all = CheckpointDir(tmp_path, keep_last=None)
    for step in (100, 200, 300):
        _save(keep_all, step)
    # The user goes back to step 100 (e.g. to retry with another lr): the run's new history
    # continues from there, and steps 200 and 300 belong to the abandoned one.
    (tmp_path / "checkpoints" / "latest").write_text("step_00000100\n")
    ckpt = CheckpointDir(tmp_path, keep_last=2)
    assert step_of(ckpt.latest()) == 100
    _save(ckpt, 150)
    assert [step_of(p) for p in ckpt.list()] == [300, 150]
    assert [read_meta(p)["commit"] for p in ckpt.list()] == [3, 4]
    (tmp_path / "checkpoints" / "latest").unlink()
    with caplog.at_level(logging.WARNING, logger="mbert_train.checkpoint"):
        assert step_of(ckpt.latest()) == 150


def test_files_and_latest_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        ckpt = CheckpointDir(tmp_path)
        tmp = ckpt.begin(100)
        # safetensors (and mkstemp) create their files 0600, whatever the umask
        os.close(os.open(tmp / "model_tp00-of-01.safetensors", os.O_CREAT | os.O_WRONLY, 0o600))
        final = ckpt.commit(100)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [tmp_path / "checkpoints" / "latest", *final.iterdir()]}
    assert modes == {"latest": 0o644, "meta.json": 0o644, "model_tp00-of-01.safetensors": 0o644}


@pytest.mark.parametrize("error, expected", [
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), "no space left"),
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), "no space left"),
    (OSError(errno.ENOSPC, "No space left on device"), "no space left"),
    (RuntimeError("[enforce fail at inline_container.cc:747] . open file failed with strerror: Read-only file "
                  "system"), "read-only file system"),
    (OSError(errno.EACCES, "Permission denied"), "permission denied"),
])
def test_failed_writes_are_one_line_errors_naming_the_file(tmp_path, error, expected):
    target = tmp_path / "checkpoints" / ".tmp-step_00000100" / "trainer_state.pt"
    with pytest.raises(CheckpointError) as info:
        with write_errors(target):
            raise error
    message = str(info.value)
    assert expected in message and str(target) in message and "\n" not in message
    with pytest.raises(KeyError):  # not an I/O failure: a bug, raised unchanged
        with write_errors(target):
            raise KeyError("x")


def test_read_only_checkpoint_dir_is_a_one_line_error(tmp_path, monkeypatch):
    ckpt = CheckpointDir(tmp_path)
    _save(ckpt, 100)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(args[0]))

    with monkeypatch.context() as m:
        m.setattr(Path, "mkdir", read_only)
        with pytest.raises(CheckpointError, match=r"\.tmp-step_00000200 is on a read-only file system"):
            ckpt.begin(200)
    tmp = ckpt.begin(200)
    with monkeypatch.context() as m:
        m.setattr(os, "rename", read_only)
        with pytest.raises(CheckpointError, match="read-only file system"):
            ckpt.commit(200)
    assert ckpt.latest() == ckpt.path(100) and not tmp.exists()


def test_empty_or_corrupt_json_names_the_file(tmp_path):
    ckpt = CheckpointDir(tmp_path)
    final = _save(ckpt, 100)
    for text, problem in [("", "is empty"), ("  \n", "is empty"), ('{"step": 1', "is truncated or corrupt"),
                          ("[1, 2]", "holds a JSON list")]:
        (final / "meta.json").write_text(text)
        with pytest.raises(CheckpointError) as info:
            read_meta(final)
        assert str(info.value).startswith(f"checkpoint file {final / 'meta.json'} {problem}")
    assert issubclass(CheckpointError, UserError) and issubclass(TrainingDiverged, UserError)


def test_scalars_accept_only_the_engine_counters(tmp_path):
    counters = {"global_steps": 4, "skipped_steps": 0}
    good = {"step": 4, "bad_in_a_row": 0, "skipped": 0, "optimizer": {}, "scheduler": {}, "loader": {},
            "engine": counters}
    assert checked_scalars(good, tmp_path) is good
    for engine in [{**counters, "optimizer": None}, {**counters, "__class__": "x"},
                   {**counters, "global_steps": "4"}, {k: v for k, v in counters.items() if k != "skipped_steps"}]:
        with pytest.raises(CheckpointError, match="only the integer counters"):
            checked_scalars({**good, "engine": engine}, tmp_path)
    with pytest.raises(CheckpointError, match=r"lacks \['loader'\]"):
        checked_scalars({k: v for k, v in good.items() if k != "loader"}, tmp_path)
    with pytest.raises(CheckpointError, match="holds list scalars"):
        checked_scalars([good], tmp_path)


class _FakeEngine:
    """The `Engine` seam around a Linear and an Adam-like state, DP=2 at ZeRO-0."""

    zero, mixed = False, False

    def __init__(self):
        self.module = torch.nn.Linear(2, 2)
        optimizer = torch.optim.SGD(self.module.parameters(), lr=0.1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        self.moments = {n: {k: torch.zeros(p.numel()) for k in ("exp_avg", "exp_avg_sq")}
                        for n, p in self.module.named_parameters()}

    def fragments(self):
        from mbert_train.checkpoint.dcp import Fragment
        from mbert_train.parallel.layers import Sharding

        return [Fragment(n, tuple(p.shape), 0, p.numel(), {**self.moments[n], "param": p.data.view(-1)},
                         Sharding(False))
                for n, p in self.module.named_parameters()]

    def weight_fragments(self):
        return [f for f in self.fragments()]

    def state_kinds(self):
        return ("exp_avg", "exp_avg_sq")

    def scalar_state(self):
        return {"adam_step": 3.0}

    def load_scalar_state(self, scalars):
        pass

    def after_load(self, master_loaded):
        pass

    def set_counters(self, global_steps, skipped_steps):
        pass

    def counters(self):
        return {"global_steps": 3, "skipped_steps": 0}


def _fake_trainer(run_dir: str, rank: int) -> Trainer:
    """A Trainer around a tiny stand-in engine, DP=2: enough for save() and resume()'s checks."""
    trainer = Trainer.__new__(Trainer)
    trainer.cfg, trainer.step, trainer.bad_in_a_row, trainer.skipped = TrainConfig(), 3, 0, 0
    trainer.state = SimpleNamespace(rank=rank, dp_rank=rank, tp_rank=0,
                                    dims=SimpleNamespace(tensor_parallel=1, data_parallel=2))
    trainer.engine = _FakeEngine()
    trainer.device = torch.device("cpu")
    loader = SimpleNamespace(state_dict=lambda: {"batches": 3}, load_state_dict=lambda state: None)
    trainer.checkpoints = Checkpointer(trainer.cfg, trainer.state, trainer.engine, loader, Path(run_dir),
                                       trainer.device)
    return trainer


def _two_ranks_fail_together(run_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    rank = dist.get_rank()
    trainer = _fake_trainer(run_dir, rank)
    trainer.save()
    first = Path(run_dir) / "checkpoints" / "step_00000003"
    assert {p.name for p in first.iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp", "meta.json"}
    assert trainer.resume() and trainer.step == 3 and trainer._pending_rng is not None
    # Non-finite weights on one rank only (one TP shard): every rank refuses, none waits.
    trainer.step = 4
    weight = trainer.engine.module.weight
    saved = weight.detach().clone()
    if rank == 1:
        with torch.no_grad():
            weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="not finite at step 4"):
        trainer.save()
    assert not (Path(run_dir) / "checkpoints" / ".tmp-step_00000004").exists()
    with torch.no_grad():
        weight.copy_(saved)
    # The disk fills while rank 1 writes its file: both ranks raise, the first checkpoint stays.
    trainer.step = 5
    real_write = FileSystemWriter.write_data
    if rank == 1:
        def full_disk(self, plan, planner):
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(self.path) / "__1_0.distcp"))
        FileSystemWriter.write_data = full_disk
    with pytest.raises(CheckpointError, match="no space left on the device while writing checkpoint .*__1_0.distcp"):
        trainer.save()
    FileSystemWriter.write_data = real_write
    assert (Path(run_dir) / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    # Rank 1's file is gone by the time rank 0 commits (a run.dir the nodes do not share): not committed.
    trainer.step = 6
    checkpoints = trainer.checkpoints
    real = checkpoints._write
    if rank == 1:
        def write_then_lose(tmp, counters):
            entries = real(tmp, counters)
            (tmp / "__1_0.distcp").unlink()
            return entries
        checkpoints._write = write_then_lose
    expected = (r"__1_0.distcp that rank 1 wrote is missing as rank 0 sees it; the checkpoint of step 6 is not "
                r"committed \(the previous one stays\): run.dir must be one folder every node sees") if rank == 0 \
        else "writing the checkpoint of step 6 failed on another rank"
    with pytest.raises(CheckpointError, match=expected):
        trainer.save()
    checkpoints._write = real
    assert (Path(run_dir) / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert not (Path(run_dir) / "checkpoints" / "step_00000006").exists()
    # An empty meta.json: resume names it, on every rank.
    dist.barrier()
    meta = (first / "meta.json").read_text()
    if rank == 0:
        (first / "meta.json").write_text("")
    dist.barrier()
    with pytest.raises(CheckpointError, match=f"checkpoint file {first / 'meta.json'} is empty"):
        trainer.resume()
    # Rank 1's file of the committed checkpoint is truncated, then missing: the manifest check
    # (each rank reads its share of the files) names it on both ranks, before anything loads.
    data = (first / "__1_0.distcp").read_bytes()
    dist.barrier()
    if rank == 0:
        (first / "meta.json").write_text(meta)
        (first / "__1_0.distcp").write_bytes(data[: len(data) // 2])
    dist.barrier()
    expected = (f"checkpoint file {first / '__1_0.distcp'} holds {len(data) // 2:,} bytes where {len(data):,} "
                f"were saved (truncated); put the original back, or start over in a new run.dir")
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        trainer.resume()
    dist.barrier()
    if rank == 0:
        (first / "__1_0.distcp").unlink()
    dist.barrier()
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint file {first / '__1_0.distcp'} is missing; ")):
        trainer.resume()


def test_checkpoint_failures_on_one_rank_stop_every_rank(tmp_path):
    spawn(_two_ranks_fail_together, 2, str(tmp_path))


def test_truncated_state_file_stops_mbert_train_with_one_line(one_step_run, tmp_path, corpus_cache):
    run_dir = tmp_path / "run"
    shutil.copytree(one_step_run, run_dir)
    state = run_dir / "checkpoints" / "step_00000001" / "__0_0.distcp"
    saved = state.stat().st_size
    state.write_bytes(state.read_bytes()[:1000])
    proc = train(run_dir, corpus_cache, ["trainer.max_steps=2", *ONE_STEP], check=False, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (  # found by the manifest check, before anything loads
        f"mbert-train: error: checkpoint file {state} holds 1,000 bytes where {saved:,} were saved (truncated); "
        "put the original back, or start over in a new run.dir (no earlier checkpoint exists)")
    meta_file = state.parent / "meta.json"  # without its manifest: found when it loads
    meta_file.write_text(json.dumps({k: v for k, v in json.loads(meta_file.read_text()).items() if k != "files"}))
    proc = train(run_dir, corpus_cache, ["trainer.max_steps=2", *ONE_STEP], check=False, timeout=300)
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"mbert-train: error: checkpoint state {state.parent} is truncated or corrupt ("), last
    assert last.endswith("); delete the checkpoint dir or point run.dir elsewhere"), last


def test_checkpoints_of_earlier_formats_are_refused_in_one_line(tmp_path):
    from mbert_train.checkpoint.state import require_format

    old = tmp_path / "checkpoints" / "step_00000010"
    old.mkdir(parents=True)
    (old / "meta.json").write_text(json.dumps({"step": 10, "commit": 1, "layout": {}}))
    (old / "trainer_rank00000.pt").write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        require_format(old)
    message = str(info.value)
    assert "\n" not in message and f"trainer.init_from={old}" in message
    (old / "meta.json").write_text(json.dumps({"format": 2, "step": 10, "commit": 1, "layout": {}}))
    with pytest.raises(CheckpointError) as info:
        require_format(old)
    assert str(info.value) == (f"checkpoint {old} is in format 2 of an earlier mbert-train; upgrade it in place with "
                               f"`mbert-convert upgrade-checkpoint {old}`, then rerun")
    (old / "meta.json").write_text(json.dumps({"format": 3, "step": 10, "commit": 1, "layout": {}}))
    assert require_format(old)["step"] == 10
