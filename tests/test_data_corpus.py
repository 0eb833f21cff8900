"""The embedded default corpus (stdlib docstrings): built once, cached, safe to race for.

`embedded_corpus` is shared with the other data test modules.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from data_prep.format import is_prepared_dataset
from mbert_train.data import DataConfig, check_vocab, open_dataset, prepare_default_corpus
from mbert_train.data import stdlib_docs


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


def test_check_vocab_names_setting_file_and_fix(embedded_dir):
    meta = open_dataset(embedded_dir).metadata
    check_vocab(meta, meta["vocab_size"], embedded_dir)
    with pytest.raises(ValueError) as info:
        check_vocab(meta, 30522, embedded_dir)
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
