"""What a resume checks before it loads: every file of the checkpoint as its manifest records it
(size and CRC-32), and the corpus its data position counts (the fingerprint). Refusals are one
line; checkpoints from before either resume as they did. Trained in-process on forked gloo
ranks (the process boundary proves nothing here; see tests/test_resume_control.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mbert_train import manifest
from mbert_train.checkpoint import CheckpointDir, CheckpointError
from tests.test_resume_control import failure, train
from tests.train_util import losses


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory, corpus_cache) -> Path:
    """A 6-step run with checkpoints at steps 2, 4 and 6."""
    run_dir = tmp_path_factory.mktemp("manifest") / "run"
    train(run_dir, ["trainer.resume=none"])
    return run_dir


def refusal(run_dir: Path, overrides: list[str], error: str) -> str:
    """The one-line message of the `error` (class name) a start raises."""
    kind, _, line = failure(run_dir, overrides).partition(": ")
    assert kind.endswith(f".{error}"), kind
    return line


def _checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def test_meta_json_lists_every_file_with_its_size_and_checksum(six_steps):
    checkpoint = _checkpoint(six_steps, 6)
    files = json.loads((checkpoint / "meta.json").read_text())["files"]
    on_disk = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()}
    assert set(files) == on_disk - {"meta.json"}
    for name, entry in files.items():
        assert entry == {"size": (checkpoint / name).stat().st_size, "crc32": manifest.checksum(checkpoint / name),
                         "rank": 0}


@pytest.mark.parametrize("damage", ["foreign", "truncated", "missing"])
def test_a_foreign_truncated_or_missing_file_is_refused_in_one_line(six_steps, tmp_path, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(six_steps, run_dir)
    last = _checkpoint(run_dir, 6)
    if damage == "foreign":  # the same file of another step: other bytes
        target = last / "__0_0.distcp"
        shutil.copyfile(_checkpoint(run_dir, 4) / "__0_0.distcp", target)
        saved = json.loads((last / "meta.json").read_text())["files"]["__0_0.distcp"]["size"]
        what = ("is not the file saved there (CRC-32 " if target.stat().st_size == saved else
                f"holds {target.stat().st_size:,} bytes where {saved:,} were saved (replaced)")
    elif damage == "truncated":
        target = last / "__0_0.distcp"
        target.write_bytes(target.read_bytes()[:-100])
        what = f"holds {target.stat().st_size:,} bytes where {target.stat().st_size + 100:,} were saved (truncated)"
    else:
        target = last / ".metadata"
        target.unlink()
        what = "is missing"
    line = refusal(run_dir, [], "CheckpointError")
    assert line.startswith(f"checkpoint file {target} {what}"), line
    assert line.endswith("put the original back, or continue from the checkpoint before it with trainer.resume=4 "
                         "(later checkpoints are set aside, not deleted)"), line
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert not list((run_dir / "checkpoints").glob("set_aside_*"))


def test_a_checkpoint_without_a_manifest_resumes_unchecked_and_exactly(six_steps, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(six_steps, run_dir)
    meta_file = _checkpoint(run_dir, 4) / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["files"]  # as checkpoints were written before the manifest
    meta_file.write_text(json.dumps(meta))
    out = train(run_dir, ["trainer.resume=4"])
    assert "resumed at step 4 (trainer.resume=4; later checkpoints moved to" in out
    assert losses(run_dir) == losses(six_steps)  # bit for bit, steps 5-6 retrained


def test_commit_refuses_a_listed_file_that_is_not_there(tmp_path):
    (tmp_path / "run").mkdir()
    ckpt = CheckpointDir(tmp_path / "run")
    tmp = ckpt.begin(2)
    torch.save({"w": torch.zeros(4)}, tmp / "a.pt")
    files = manifest.describe(tmp, [tmp / "a.pt"], rank=0)
    for name, entry in (("b.pt", {**files["a.pt"], "rank": 3}), ("a.pt", {**files["a.pt"], "size": 1})):
        with pytest.raises(CheckpointError) as info:
            ckpt.commit(2, files={**files, name: entry})
        line = str(info.value)
        assert f"checkpoint file {tmp / name}" in line and "the checkpoint of step 2 is not committed" in line, line
        assert not ckpt.path(2).exists() and not (ckpt.root / "latest").exists()
    assert json.loads((ckpt.commit(2, files=files) / "meta.json").read_text())["files"] == files


def resplit(corpus: str, out: Path) -> str:
    """A copy of the prepared corpus `corpus` with one sentence boundary moved by a token: the
    same text and token count, split into sentences another way."""
    shutil.copytree(corpus, out)
    path = out / "sentence_offsets.npy"
    offsets = np.load(path)
    k = int(np.nonzero(np.diff(offsets)[1:] >= 2)[0][0]) + 1  # sentence k keeps a token
    offsets[k] += 1
    np.save(path, offsets)
    return str(out)


def test_the_same_text_split_otherwise_is_refused_unless_accepted(six_steps, tmp_path, corpus_cache):
    from mbert_train.data import DataConfig, open_dataset, prepare_default_corpus

    original = prepare_default_corpus(DataConfig(cache_dir=corpus_cache))
    other = resplit(original, tmp_path / "resplit")
    assert open_dataset(other).metadata["num_tokens"] == open_dataset(original).metadata["num_tokens"]
    run_dir = tmp_path / "run"
    shutil.copytree(six_steps, run_dir)
    line = refusal(run_dir, [f"data.path={other}"], "DatasetError")
    assert line.startswith(f"data.path={other} is not the corpus the checkpoint's data position counts"), line
    assert "new run.dir" in line and line.endswith("or continue this one with data.accept_changed_corpus=true")
    out = train(run_dir, [f"data.path={other}", "data.accept_changed_corpus=true", "trainer.max_steps=7"])
    start = next(s for s in out.splitlines() if s.startswith("[mbert-train] run dir"))
    assert "resumed at step 6 (data.accept_changed_corpus=true: the corpus changed since the checkpoint" in start
    assert max(losses(run_dir)) == 7


def test_loader_state_records_the_corpus_and_older_states_resume_unchecked(corpus_cache, tmp_path):
    from mbert_train.data import DataConfig, build_loaders, prepare_default_corpus
    from mbert_train.data.corpus import DatasetError

    original = prepare_default_corpus(DataConfig(cache_dir=corpus_cache))
    other = resplit(original, tmp_path / "resplit")
    kwargs = dict(seed=5, micro_batch_size=8, dp_rank=0, dp_size=1)

    def loader(path: str, **settings):
        return build_loaders(DataConfig(num_workers=0, **settings), path, **kwargs)[0]

    first = loader(original)
    first.take(3)
    state = first.state_dict()
    assert loader(original).load_state_dict(state) is None  # the same corpus: exactly where it was
    with pytest.raises(DatasetError, match="data.accept_changed_corpus=true"):
        loader(other).load_state_dict(state)
    accepting = loader(other, accept_changed_corpus=True)
    assert accepting.load_state_dict(state).startswith("data.accept_changed_corpus=true: the corpus changed")
    assert accepting.global_samples == 24
    # A state from before the fingerprint: its signature ends with the token count, which matches.
    old = {k: v for k, v in state.items() if k != "corpus"}
    old["signature"] += f"/{first.dataset.corpus.metadata['num_tokens']}"
    assert loader(other).load_state_dict(old) is None
