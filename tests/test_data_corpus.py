"""The embedded default corpus (stdlib docstrings): built once, cached, safe to race for.

`embedded_corpus` is shared with the other data test modules.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from data_prep import PrepConfig
from data_prep.format import is_prepared_dataset
from data_prep.prep import prepare
from mbert_train.data import DataConfig, resolve_vocab, open_dataset, prepare_default_corpus
from mbert_train.data import corpus as corpus_module
from mbert_train.data import stdlib_docs
from mbert_train.data.corpus import DatasetError
from mbert_train.errors import UserError
from tests.test_data_prep import prose
from tests.train_util import train


def embedded_corpus(cache: str) -> str:
    """The default corpus in `cache`: built by the first caller, then a lookup."""
    return prepare_default_corpus(DataConfig(cache_dir=cache))


@pytest.fixture(scope="module")
def embedded_dir(corpus_cache) -> str:
    # `corpus_cache` (tests/conftest.py) is the session's one cache, shared with the trainer
    # tests, so the corpus is built once per session.
    return embedded_corpus(corpus_cache)


def test_default_corpus_is_real_prose_and_cached(embedded_dir, corpus_cache):
    corpus = open_dataset(embedded_dir)
    meta = corpus.metadata
    assert meta["vocab_size"] == DataConfig().default_vocab_size
    assert meta["lowercase"] is True
    s = meta["summary"]
    assert s["documents"] > 200 and s["tokens"] > 100_000
    assert len(corpus.split_docs("heldout")) >= 2
    vocab = set(corpus.vocab)
    for word in ("the", "return", "file", "module", "string"):
        assert word in vocab
    again = embedded_corpus(corpus_cache)
    assert again == embedded_dir
    assert os.path.getmtime(os.path.join(again, "metadata.json")) == os.path.getmtime(
        os.path.join(embedded_dir, "metadata.json"))


def test_docstring_extraction_is_deterministic(tmp_path):
    script = stdlib_docs.__file__
    texts = []
    for name in ("a.txt", "b.txt"):
        subprocess.run([sys.executable, "-I", script, str(tmp_path / name)], check=True,
                       timeout=120, capture_output=True)
        texts.append((tmp_path / name).read_bytes())
    assert texts[0] == texts[1]
    docs = texts[0].decode().split("\n\n")
    assert not any(">>>" in d for d in docs)
    assert any(d.startswith("Abstract Base Classes") for d in docs)


RACE = """
import sys
from mbert_train.data import DataConfig, prepare_default_corpus
print(prepare_default_corpus(DataConfig(cache_dir=sys.argv[1], default_vocab_size=2048)))
"""


@pytest.mark.slow
def test_two_processes_racing_on_first_use_share_one_result(tmp_path):
    cache = str(tmp_path / "cache")
    procs = [subprocess.Popen([sys.executable, "-c", RACE, cache], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1
    path = paths.pop()
    assert is_prepared_dataset(path)
    assert json.load(open(os.path.join(path, "metadata.json")))["vocab_size"] == 2048
    leftovers = [p for p in os.listdir(cache) if ".staging-" in p or ".partial-" in p]
    assert leftovers == []


def test_resolve_vocab_names_setting_file_and_fix(embedded_dir):
    meta = open_dataset(embedded_dir).metadata
    assert resolve_vocab(meta, meta["vocab_size"], embedded_dir) == meta["vocab_size"]
    assert resolve_vocab(meta, None, embedded_dir) == meta["vocab_size"]  # unset: follows the dataset
    with pytest.raises(ValueError) as info:
        resolve_vocab(meta, 30522, embedded_dir)
    msg = str(info.value)
    assert "\n" not in msg
    fix = f"model.vocab_size={meta['vocab_size']}"
    for needle in ("model.vocab_size=30522", "metadata.json", fix, "--vocab-size"):
        assert needle in msg


def test_corpus_pickles_by_path(embedded_dir):
    corpus = open_dataset(embedded_dir)
    blob = pickle.dumps(corpus)
    assert len(blob) < 10_000
    back = pickle.loads(blob)
    assert np.array_equal(np.asarray(back.tokens[:100]), np.asarray(corpus.tokens[:100]))


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """A 12-document dataset with a 100-entry vocabulary; tests corrupt copies of it."""
    root = tmp_path_factory.mktemp("small")
    (root / "in.txt").write_text("\n\n".join(prose(6, i) for i in range(12)))
    prepare(PrepConfig(inputs=[str(root / "in.txt")], output=str(root / "ds"), vocab_size=100,
                       heldout_fraction=0.2, quiet=True))
    return root / "ds"


def copy_of(dataset, tmp_path):
    return shutil.copytree(dataset, tmp_path / "ds")


def open_error(path) -> str:
    with pytest.raises(DatasetError) as info:
        open_dataset(str(path))
    assert "\n" not in str(info.value)
    return str(info.value)


def edit_metadata(path, **changes) -> None:
    meta = json.loads((path / "metadata.json").read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    (path / "metadata.json").write_text(json.dumps(meta))


def test_prep_records_the_largest_token_id(small_dataset):
    corpus = open_dataset(str(small_dataset))
    meta = json.loads((small_dataset / "metadata.json").read_text())
    assert meta["max_token_id"] == int(np.max(corpus.tokens)) < meta["vocab_size"] == 100
    assert len(corpus.split_docs("heldout")) >= 2


@pytest.mark.parametrize("name", ["tokens.npy", "sentence_offsets.npy", "doc_offsets.npy",
                                  "train_docs.npy", "heldout_docs.npy"])
def test_a_truncated_array_fails_at_open_naming_the_file(small_dataset, tmp_path, name):
    path = copy_of(small_dataset, tmp_path) / name
    data = path.read_bytes()
    path.write_bytes(data[:-8])
    msg = open_error(path.parent)
    assert str(path) in msg and "mbert-prep" in msg


def test_arrays_disagreeing_with_metadata_fail_at_open(small_dataset, tmp_path):
    ds = copy_of(small_dataset, tmp_path)
    tokens = np.load(ds / "tokens.npy")
    np.save(ds / "tokens.npy", tokens[:-5])  # a valid .npy, but short
    msg = open_error(ds)
    assert str(ds / "tokens.npy") in msg and f"{len(tokens) - 5:,} tokens" in msg
    np.save(ds / "tokens.npy", tokens)
    offsets = np.load(ds / "sentence_offsets.npy")
    offsets[-1] -= 1
    np.save(ds / "sentence_offsets.npy", offsets)
    assert str(ds / "sentence_offsets.npy") in open_error(ds)


def test_token_ids_outside_the_vocabulary_fail_at_open(small_dataset, tmp_path, monkeypatch):
    ds = copy_of(small_dataset, tmp_path)
    tokens = np.load(ds / "tokens.npy")
    tokens[3] = 100                              # == vocab_size: one past the embedding
    np.save(ds / "tokens.npy", tokens)
    for stored in (99, None):                    # a wrong max_token_id, or none (older datasets)
        edit_metadata(ds, max_token_id=stored)
        msg = open_error(ds)
        assert str(ds / "tokens.npy") in msg and "token id 100" in msg
    # Large corpora trust metadata.json rather than scan: it must be honoured too.
    monkeypatch.setattr(corpus_module, "SCAN_TOKENS_UP_TO", 0)
    np.save(ds / "tokens.npy", np.minimum(tokens, 99))
    edit_metadata(ds, max_token_id=99)
    assert open_dataset(str(ds)).metadata["max_token_id"] == 99
    edit_metadata(ds, max_token_id=100)
    assert "token id 100" in open_error(ds)


def test_trainer_recognises_a_dataset_by_its_format_marker(small_dataset, tmp_path):
    from mbert_train.train import _dataset_dir

    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "metadata.json").write_text('{"title": "my notes"}')
    with pytest.raises(DatasetError) as info:
        _dataset_dir(SimpleNamespace(data=SimpleNamespace(path=str(folder))), 0)
    msg = str(info.value)
    assert "\n" not in msg and f"data.path={folder}" in msg and "mbert-train-corpus" in msg
    assert "mbert-train-corpus" in open_error(folder)
    ours = SimpleNamespace(data=SimpleNamespace(path=str(small_dataset)))
    assert _dataset_dir(ours, 0) == str(small_dataset)


def test_mbert_train_refuses_a_truncated_dataset_in_one_line(small_dataset, tmp_path,
                                                             corpus_cache):
    ds = copy_of(small_dataset, tmp_path)
    (ds / "tokens.npy").write_bytes((ds / "tokens.npy").read_bytes()[:-8])
    proc = train(tmp_path / "run", corpus_cache, ["data=prepared", f"data.path={ds}",
                                                  "model.vocab_size=100", "trainer.max_steps=2"],
                 check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and str(ds / "tokens.npy") in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_default_corpus_failures_are_one_line_user_errors(tmp_path, monkeypatch):
    from filelock import FileLock

    from mbert_train.data import default_corpus

    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    # The extraction subprocess fails (here: an interpreter that exits 1 at once).
    monkeypatch.setattr(sys, "executable", shutil.which("false"))
    with pytest.raises(UserError, match="extracting the default corpus") as info:
        prepare_default_corpus(cfg)
    assert "\n" not in str(info.value) and "data.path" in str(info.value)
    monkeypatch.undo()
    # Another process holds the build lock past the timeout.
    monkeypatch.setattr(default_corpus, "LOCK_TIMEOUT_S", 0.2)
    lock = tmp_path / "cache" / f"{default_corpus.corpus_key(cfg)}.lock"
    with FileLock(str(lock)):
        with pytest.raises(UserError, match="waited 0.2 s") as info:
            prepare_default_corpus(cfg)
    assert str(lock) in str(info.value)
    # A cache that cannot be created: one line naming it.
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=str(tmp_path / "file")):
        prepare_default_corpus(DataConfig(cache_dir=str(tmp_path / "file" / "cache")))
