"""Checkpoint directory protocol: atomic commit, `latest`, rotation, crash recovery, loaders,
and the RNG state the trainer stores in checkpoints."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mbert_train.checkpoint import (CheckpointDir, CheckpointError, load_tensors, load_torch,
                                    read_meta, step_of, step_tag)
from mbert_train.rng import capture_rng_state, restore_rng_state, seed_everything


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


def test_truncated_and_missing_files_give_one_line_errors(tmp_path):
    torch.save({"w": torch.randn(256)}, tmp_path / "model.pt")
    full = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "model.pt").write_bytes(full[: len(full) // 2])
    with pytest.raises(CheckpointError) as info:
        load_torch(tmp_path / "model.pt")
    msg = str(info.value)
    assert msg == (f"checkpoint file {tmp_path / 'model.pt'} is truncated or corrupt; "
                   "delete the checkpoint dir or point run.dir elsewhere")
    save_file({"w": torch.randn(256)}, tmp_path / "model.safetensors")
    full = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(full[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupt"):
        load_tensors(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="optim.pt is missing"):
        load_torch(tmp_path / "optim.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_torch(tmp_path / "empty.pt")
    good = {"w": torch.arange(3.0)}
    save_file(good, tmp_path / "good.safetensors")
    assert torch.equal(load_tensors(tmp_path / "good.safetensors")["w"], good["w"])
    assert "\n" not in msg


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
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path), phase],
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "PAUSED"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
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


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    seed_everything(1234)
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
    seed_everything(1234)
    first = draw()
    seed_everything(1234)
    assert draw() == first
    with pytest.raises(ValueError, match="seed=-1"):
        seed_everything(-1)
