"""Faults the way they arrive: a disk that fills while the training state is written."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.dist import spawn
from tests.test_resume_control import RUN


def _train_on_a_full_disk(run_dir: Path) -> None:
    """Train 2 steps; every training-state file (`.distcp`) is written to /dev/full, where the
    kernel answers ENOSPC as a full disk does."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    from mbert_train.config import compose_config
    from mbert_train.train import run

    real = FileSystem.create_stream

    @contextmanager
    def full_disk(self, path, mode):
        if str(path).endswith(".distcp") and "w" in mode:
            with open("/dev/full", mode) as stream:
                yield stream
        else:
            with real(self, path, mode) as stream:
                yield stream

    FileSystem.create_stream = full_disk
    run(compose_config([*RUN, "trainer.max_steps=2", f"run.dir={run_dir}"]), str(run_dir))


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full to deliver ENOSPC")
def test_full_disk_while_writing_the_training_state_is_one_line(tmp_path, corpus_cache):
    with pytest.raises(AssertionError) as info:
        spawn(_train_on_a_full_disk, 1, tmp_path / "run")
    last = str(info.value).strip().splitlines()[-1]
    assert last.startswith("mbert_train.checkpoint.dir.CheckpointError:"), last
    assert "no space left on the device while writing checkpoint" in last and last.endswith("elsewhere"), last
    assert not (tmp_path / "run" / "checkpoints" / "step_00000002").exists()  # nothing half-written committed


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4480 vs 4374"),  # torch.save, disk full
    RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
    OSError(28, "No space left on device"),
])
def test_training_state_write_errors_of_a_full_disk_are_one_line(tmp_path, error):
    """torch reports a full disk inside torch.save only as the text of a RuntimeError."""
    from mbert_train.checkpoint import CheckpointError
    from mbert_train.checkpoint.state import _dcp_errors

    with pytest.raises(CheckpointError, match="no space left on the device while writing checkpoint"):
        with _dcp_errors(tmp_path / "step", "writing the training state to"):
            raise error


def test_other_runtime_errors_of_a_write_keep_their_traceback(tmp_path):
    from mbert_train.checkpoint.state import _dcp_errors

    with pytest.raises(RuntimeError, match="a bug"):
        with _dcp_errors(tmp_path / "step", "writing the training state to"):
            raise RuntimeError("a bug")


def _train_while_the_run_dir_is_deleted(run_dir: Path, after: str) -> None:
    """Train 3 steps (checkpoints at 2 and 3); delete the run dir after step 2's forward and
    backward (`after="step"`), or after the last checkpoint (`after="save"`)."""
    import shutil

    from mbert_train.config import compose_config
    from mbert_train.train import run
    from mbert_train.trainer import Trainer

    real = getattr(Trainer, "train_step" if after == "step" else "save")

    def then_delete(self, *args):
        out = real(self, *args)
        if (after == "step" and self.step + 1 == 2) or (after == "save" and self.step == 3):
            shutil.rmtree(run_dir)
        return out

    setattr(Trainer, "train_step" if after == "step" else "save", then_delete)
    run(compose_config([*RUN, "trainer.max_steps=3", "trainer.checkpoint_every=2", f"run.dir={run_dir}"]),
        str(run_dir))


@pytest.mark.parametrize("after, what", [("step", "the checkpoint of step 2 is not written"),
                                         ("save", "the export and curves of step 3 are not written")])
def test_a_run_dir_deleted_under_a_running_job_is_named(tmp_path, corpus_cache, after, what):
    run_dir = tmp_path / "run"
    with pytest.raises(AssertionError) as info:
        spawn(_train_while_the_run_dir_is_deleted, 1, run_dir, after)
    last = str(info.value).strip().splitlines()[-1]
    assert f"run dir {run_dir} is gone (deleted or unmounted while the run was training)" in last, last
    assert what in last and "new run.dir" in last, last
    assert not run_dir.exists()  # never recreated
