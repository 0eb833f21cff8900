"""Megatron-LM indexed datasets (.bin/.idx) as `mbert-prep` input, refereed by megatron-core.

megatron-core (a `test` extra) writes the datasets with its own `IndexedDatasetBuilder` and reads
them back with its own `IndexedDataset`; what `mbert-prep` makes of them must hold exactly those
token ids, documents and sentences, and train.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import warnings

import numpy as np
import pytest
import torch

from data_prep.prep import main
from mbert_train.data import open_dataset
from data_prep.indexed import IndexedDataset
from tests.train_util import losses, train

with warnings.catch_warnings():  # megatron.core warns that Apex/Transformer Engine are absent
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import DType
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronDataset
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

WORDS = [f"word{i}" for i in range(100)]
# Laid out like Google's BERT vocabularies ([PAD], [unusedN], then [UNK] [CLS] [SEP] [MASK]), so
# the special ids are found by name, not assumed to be 0-4.
VOCAB = ["[PAD]", *(f"[unused{i}]" for i in range(5)), "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
SPECIAL = {"pad": 0, "unk": 6, "cls": 7, "sep": 8, "mask": 9}
MAX_SENTENCE = 16


def make_docs(seed: int, n_docs: int) -> list[list[list[int]]]:
    """Documents of 1-7 sentences of word ids, plus one empty document, one empty sentence and
    one sentence longer than MAX_SENTENCE."""
    rng = np.random.default_rng(seed)
    docs = [[rng.integers(len(VOCAB) - len(WORDS), len(VOCAB), size=rng.integers(3, 15)).tolist()
             for _ in range(rng.integers(1, 8))] for _ in range(n_docs)]
    docs[2] = []
    docs[4].insert(1, [])
    docs[5][0] = rng.integers(10, len(VOCAB), size=2 * MAX_SENTENCE + 5).tolist()
    return docs


def write_megatron(prefix, docs, dtype=None, *, multimodal: bool = False) -> str:
    """Write `docs` with megatron-core's builder (the way its preprocess_data.py does)."""
    dtype = dtype or DType.optimal_dtype(len(VOCAB))
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype, multimodal=multimodal)
    for doc in docs:
        for sentence in doc:
            builder.add_item(torch.tensor(sentence, dtype=torch.int64))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def megatron_docs(prefix) -> list[list[list[int]]]:
    """The documents as megatron-core's own reader sees them."""
    ds = MegatronDataset(str(prefix))
    bounds = ds.document_indices
    return [[ds[i].tolist() for i in range(bounds[d], bounds[d + 1])]
            for d in range(len(bounds) - 1)]


def as_prepared(docs) -> list[list[list[int]]]:
    """What the prepared corpus must hold: empty sentences and documents dropped, long
    sentences cut into MAX_SENTENCE pieces, ids and order unchanged."""
    out = []
    for doc in docs:
        sentences = [s[i:i + MAX_SENTENCE] for s in doc for i in range(0, len(s), MAX_SENTENCE)]
        if sentences:
            out.append(sentences)
    return out


def prepared_docs(path, doc_ids=None) -> list[list[list[int]]]:
    corpus = open_dataset(str(path))
    ids = range(corpus.num_documents) if doc_ids is None else doc_ids
    return [[corpus.sentence_span_tokens(s, s + 1).tolist()
             for s in range(*corpus.doc_sentences(int(d)))] for d in ids]


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n")
    return path


def prep(*args) -> int:
    return main([*map(str, args), "--max-sentence-tokens", str(MAX_SENTENCE), "--quiet"])


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.int64, np.uint16])
def test_reader_matches_megatron_core_for_every_token_dtype(tmp_path, dtype):
    docs = make_docs(0, 8)
    prefix = write_megatron(tmp_path / "d", docs, dtype)
    ours = IndexedDataset(prefix)
    assert ours.dtype == np.dtype(dtype) and ours.num_documents == len(docs)
    ref = MegatronDataset(prefix)  # kept alive: its arrays die with its memory map
    np.testing.assert_array_equal(ours.document_indices, ref.document_indices)
    read = [[ours.sequence(i).tolist() for i in range(ours.document_indices[d],
                                                        ours.document_indices[d + 1])]
            for d in range(ours.num_documents)]
    assert read == megatron_docs(prefix) == docs


def test_megatron_dataset_converts_with_its_ids_documents_and_sentences(tmp_path, vocab_file):
    # Two prefixes (uint16 as preprocess_data.py picks for this vocabulary, and int32) are
    # concatenated in order.
    a = write_megatron(tmp_path / "a_text_sentence", make_docs(1, 30))
    b = write_megatron(tmp_path / "b_text_sentence", make_docs(2, 20), np.int32)
    out = tmp_path / "ds"
    # A prefix may be named as such or by either file of the pair.
    assert prep(a, f"{b}.idx", "--vocab-file", vocab_file, "-o", out,
                "--heldout-fraction", "0.1") == 0
    assert prepared_docs(out) == as_prepared(megatron_docs(a) + megatron_docs(b))

    meta = json.loads((out / "metadata.json").read_text())
    assert meta["vocab_size"] == len(VOCAB) and meta["special_ids"] == SPECIAL
    assert meta["splitter"] == "megatron-sequences" and meta["token_dtype"] == "uint16"
    s = meta["summary"]
    assert (s["empty_documents"], s["long_sentences_split"]) == (2, 2)
    kinds = [(src["path"], src["kind"]) for src in meta["sources"]]
    assert kinds == [(f"{a}.idx", "megatron_idx"), (f"{a}.bin", "megatron_bin"),
                     (f"{b}.idx", "megatron_idx"), (f"{b}.bin", "megatron_bin")]
    assert (out / "vocab.txt").read_text().split() == VOCAB
    corpus = open_dataset(str(out))
    train_ids, held = corpus.split_docs("train"), corpus.split_docs("heldout")
    assert len(held) >= 2 and sorted([*train_ids, *held]) == list(range(corpus.num_documents))
    assert all(np.diff(corpus.doc_sentences(int(d))) >= 2 for d in held)
    assert corpus.special.mask == 9 and corpus.vocab[9] == "[MASK]"


def test_heldout_prefixes_are_exactly_the_heldout_split(tmp_path, vocab_file):
    a = write_megatron(tmp_path / "train", make_docs(3, 12))
    b = write_megatron(tmp_path / "valid", make_docs(4, 6))
    out = tmp_path / "ds"
    assert prep(a, "--heldout", b, "--vocab-file", vocab_file, "-o", out) == 0
    corpus = open_dataset(str(out))
    assert prepared_docs(out, corpus.split_docs("heldout")) == as_prepared(megatron_docs(b))
    assert prepared_docs(out, corpus.split_docs("train")) == as_prepared(megatron_docs(a))


@pytest.mark.slow
def test_mbert_train_trains_on_a_converted_megatron_dataset(tmp_path, vocab_file, corpus_cache):
    prefix = write_megatron(tmp_path / "wiki_text_sentence", make_docs(5, 40))
    out = tmp_path / "ds"
    assert prep(prefix, "--vocab-file", vocab_file, "-o", out) == 0
    run = tmp_path / "run"
    train(run, corpus_cache, ["data=prepared", f"data.path={out}",
                              f"model.vocab_size={len(VOCAB)}", "trainer.max_steps=3",
                              "trainer.eval_every=3"], timeout=300)
    seen = losses(run)
    assert sorted(seen) == [1, 2, 3] and all(math.isfinite(v) for v in seen.values())
    assert math.isfinite(losses(run, "eval_mlm_loss")[3])


def _patch(path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    offset %= len(raw)  # a negative offset counts from the end
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def _truncate(path, drop: int) -> None:
    path.write_bytes(path.read_bytes()[:-drop])


def _idx_counts(prefix) -> tuple[int, int]:
    raw = open(f"{prefix}.idx", "rb").read()
    return struct.unpack("<QQ", raw[18:34])


CORRUPTIONS = {  # name: (what it does to the prefix p / vocab v, file named, words of the message)
    "bin truncated": (lambda p, v: _truncate(p.with_suffix(".bin"), 3), ".bin", "truncated"),
    "bin too long": (lambda p, v: p.with_suffix(".bin").write_bytes(
        p.with_suffix(".bin").read_bytes() + b"\0\0"), ".bin", "different runs"),
    "bin missing": (lambda p, v: p.with_suffix(".bin").unlink(), ".bin", "no such file"),
    "bad magic": (lambda p, v: _patch(p.with_suffix(".idx"), 0, b"TNTIDX\0\0"), ".idx",
                  "MMIDIDX"),
    "bad version": (lambda p, v: _patch(p.with_suffix(".idx"), 9, struct.pack("<Q", 2)),
                    ".idx", "version 2"),
    "float dtype": (lambda p, v: _patch(p.with_suffix(".idx"), 17, bytes([7])), ".idx",
                    "float32"),
    "unknown dtype": (lambda p, v: _patch(p.with_suffix(".idx"), 17, bytes([42])), ".idx",
                      "dtype code 42"),
    "idx truncated": (lambda p, v: _truncate(p.with_suffix(".idx"), 8), ".idx", "truncated"),
    "idx header cut": (lambda p, v: p.with_suffix(".idx").write_bytes(
        p.with_suffix(".idx").read_bytes()[:20]), ".idx", "34-byte header"),
    "document indices": (lambda p, v: _patch(p.with_suffix(".idx"), -8, struct.pack(
        "<q", _idx_counts(p)[0] + 1)), ".idx", "document indices"),
    "sequence offsets": (lambda p, v: _patch(p.with_suffix(".idx"), 34 + 4 * _idx_counts(p)[0]
                                             + 8, struct.pack("<q", 1)), ".idx", "back to back"),
    "id outside vocab": (lambda p, v: v.write_text("\n".join(VOCAB[:50])), ".bin",
                         "outside the 50 entries"),
    "vocab lacks [MASK]": (lambda p, v: v.write_text("\n".join(t for t in VOCAB if t != "[MASK]")),
                           "vocab.txt", "[MASK]"),
}


@pytest.fixture(scope="module")
def clean_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    write_megatron(root / "d", make_docs(6, 10))
    return root


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corrupt_input_is_refused_in_one_line_naming_the_file(name, clean_pair, vocab_file,
                                                              tmp_path, capsys):
    corrupt, file_suffix, words = CORRUPTIONS[name]
    shutil.copy(clean_pair / "d.bin", tmp_path / "d.bin")
    shutil.copy(clean_pair / "d.idx", tmp_path / "d.idx")
    vocab = tmp_path / "vocab.txt"
    shutil.copy(vocab_file, vocab)
    corrupt(tmp_path / "d", vocab)
    capsys.readouterr()
    assert prep(tmp_path / "d", "--vocab-file", vocab, "-o", tmp_path / "ds") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    named = str(vocab) if file_suffix == "vocab.txt" else f"{tmp_path / 'd'}{file_suffix}"
    assert named in err and words in err, err
    assert not (tmp_path / "ds").exists()


def test_inputs_that_cannot_be_converted_are_refused_in_one_line(tmp_path, vocab_file, capsys):
    # As preprocess_data.py writes without --split-sentences: one sequence per document.
    flat = write_megatron(tmp_path / "flat", [[list(range(10, 10 + n))] for n in range(3, 9)])
    multi = write_megatron(tmp_path / "mm", make_docs(8, 6), multimodal=True)
    good = write_megatron(tmp_path / "good", make_docs(9, 6))
    (tmp_path / "notes.txt").write_text("Some text. More text.")
    cases = [
        ([flat, "--vocab-file", vocab_file], "--split-sentences"),
        ([multi, "--vocab-file", vocab_file], "multimodal"),
        ([good], "--vocab-file"),                                   # token ids need their vocab
        ([good, tmp_path / "notes.txt", "--vocab-file", vocab_file], "not a Megatron"),
        ([good, "--heldout", tmp_path / "notes.txt", "--vocab-file", vocab_file], "--heldout"),
    ]
    for args, words in cases:
        capsys.readouterr()
        assert prep(*args, "-o", tmp_path / "ds") == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, (args, err)
        assert not (tmp_path / "ds").exists()


def test_heldout_that_is_the_training_data_is_refused(tmp_path, vocab_file, capsys):
    a = write_megatron(tmp_path / "train", make_docs(3, 12))
    for name in ("bin", "idx"):  # a byte copy under another name
        shutil.copy(f"{a}.{name}", tmp_path / f"copy.{name}")
    for held in (a, tmp_path / "copy"):
        capsys.readouterr()
        assert prep(a, "--heldout", held, "--vocab-file", vocab_file, "-o", tmp_path / "ds") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "every training document is also a held-out one" in err, err
        assert not (tmp_path / "ds").exists()


def test_training_copies_of_heldout_documents_leave_the_training_split(tmp_path, vocab_file):
    train_docs, held_docs = make_docs(3, 12), make_docs(4, 6)
    held_docs[0], held_docs[1] = train_docs[7], train_docs[9]  # two held-out documents also in training
    a, b = write_megatron(tmp_path / "train", train_docs), write_megatron(tmp_path / "valid", held_docs)
    out = tmp_path / "ds"
    assert prep(a, "--heldout", b, "--vocab-file", vocab_file, "-o", out) == 0
    corpus = open_dataset(str(out))
    trained = prepared_docs(out, corpus.split_docs("train"))
    expected = as_prepared(megatron_docs(a))
    assert len(trained) == len(expected) - 2
    assert as_prepared([train_docs[7]])[0] not in trained and as_prepared([train_docs[9]])[0] not in trained
    assert prepared_docs(out, corpus.split_docs("heldout")) == as_prepared(megatron_docs(b))
    summary = json.loads((out / "metadata.json").read_text())["summary"]
    assert summary["heldout_copies_dropped"] == 2 and summary["train_documents"] == len(trained)
