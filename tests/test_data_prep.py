"""mbert-prep end to end: every kind of bad input counted, refusals, atomic output, tokenizers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import PrepConfig, PrepError
from data_prep.prep import prepare
from data_prep.format import is_prepared_dataset
from data_prep.sources import SourceError
from data_prep.tokenizer import TokenizerError
from mbert_train.data import open_dataset

SENTENCES = [
    "The lobster lives on rocky ground.", "It hides in crevices during the day.",
    "At night it hunts for crabs and worms.", "Its claws differ in size and shape.",
    "The larger claw crushes shells.", "The smaller claw cuts soft food.",
    "Fishermen catch it with baited pots.", "Young lobsters drift with the plankton.",
]


def prose(n_sentences: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(SENTENCES[i] for i in rng.integers(len(SENTENCES), size=n_sentences))


def write_bad_corpus(root) -> list[str]:
    """Files exercising every repair and skip, with known counts."""
    txt = root / "mixed.txt"
    docs = [prose(6, i) for i in range(6)]
    docs.append("A lone sentence makes a one-sentence document.")
    docs.append(prose(3, 9) + " " + "x" * 2500)            # one long line (cap 1000)
    docs.append("\n".join(prose(4, 20 + i) for i in range(30)))  # long document (cap 4000)
    docs.append("ab " * 300)                              # one sentence of 300 tokens (cap 256)
    body = "\n\n\n".join(docs).encode() + b"\n\nBroken bytes \xff\xfe here. And after.\n"
    txt.write_bytes(body)
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.txt").write_bytes(b"   \n\n \n")
    records = [{"text": prose(5, 100 + i)} for i in range(4)]
    lines = [json.dumps(r) for r in records]
    lines += [json.dumps({"text": ""}), json.dumps({"title": "no text"}), "{not json"]
    (root / "records.jsonl").write_text("\n".join(lines) + "\n")
    table = pa.table({"text": [prose(5, 200 + i) for i in range(3)] + ["  "]})
    pq.write_table(table, root / "table.parquet")
    return [str(root / n) for n in ("mixed.txt", "empty.txt", "blank.txt", "records.jsonl",
                                    "table.parquet")]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep.prep", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=240)


def test_cli_counts_every_bad_input(tmp_path):
    inputs = write_bad_corpus(tmp_path)
    out = tmp_path / "ds"
    done = run_cli(*inputs, "--output", str(out), "--vocab-size", "200", "--num-proc", "2",
                   "--max-line-chars", "1000", "--max-doc-chars", "4000",
                   "--max-sentence-tokens", "256", "--heldout-fraction", "0.2")
    assert done.returncode == 0, done.stderr
    meta = json.loads((out / "metadata.json").read_text())
    s = meta["summary"]
    assert s["empty_files"] == 2
    assert s["empty_documents"] == 2           # "" in jsonl, whitespace in parquet
    assert s["records_without_text"] == 1
    assert s["bad_json_lines"] == 1
    assert s["undecodable_bytes"] == 2
    assert s["long_lines_split"] == 1
    assert s["long_documents_split"] >= 1
    assert s["long_sentences_split"] == 1
    assert s["one_sentence_documents"] >= 1
    for word in ("documents", "sentences", "tokens", "empty files 2", "undecodable bytes 2",
                 "long lines split 1", "MB/s"):
        assert word in done.stdout, done.stdout
    assert meta["vocab_size"] == 200 and meta["token_dtype"] == "uint16"
    assert meta["special_ids"] == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert len(meta["sources"]) == 5 and all(len(src["sha256"]) == 64 for src in meta["sources"])
    corpus = open_dataset(str(out))
    assert corpus.num_documents == s["documents"] == meta["num_documents"]
    assert int(corpus.sentence_offsets[-1]) == len(corpus.tokens) == s["tokens"]
    train, held = corpus.split_docs("train"), corpus.split_docs("heldout")
    assert len(held) >= 2 and not set(train) & set(held)
    assert len(train) + len(held) == corpus.num_documents
    lengths = np.diff(np.asarray(corpus.sentence_offsets))
    assert lengths.min() >= 1 and lengths.max() <= 256


def test_prep_is_deterministic_given_a_tokenizer(tmp_path):
    # WordPiece training in `tokenizers` breaks count ties in hash-map order, so only runs
    # sharing a tokenizer file are byte-identical; the held-out choice never depends on it.
    inputs = write_bad_corpus(tmp_path)
    prepare(PrepConfig(inputs=inputs, output=str(tmp_path / "a"), vocab_size=200,
                       heldout_fraction=0.3, quiet=True))
    prepare(PrepConfig(inputs=inputs, output=str(tmp_path / "b"), vocab_size=200,
                       heldout_fraction=0.3, tokenizer=str(tmp_path / "a" / "tokenizer.json"),
                       quiet=True))
    a, b = open_dataset(str(tmp_path / "a")), open_dataset(str(tmp_path / "b"))
    assert np.array_equal(a.split_docs("heldout"), b.split_docs("heldout"))
    assert len(a.split_docs("heldout")) >= 2
    for name in ("tokens", "sentence_offsets", "doc_offsets"):
        assert np.array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)))
    assert a.metadata["tokenizer_sha256"] == b.metadata["tokenizer_sha256"]


def test_refuses_existing_outputs_and_overwrites_only_datasets(tmp_path):
    inputs = write_bad_corpus(tmp_path)
    out = tmp_path / "ds"
    prepare(PrepConfig(inputs=inputs, output=str(out), vocab_size=200, quiet=True))
    done = run_cli(*inputs, "--output", str(out), "--vocab-size", "200")
    assert done.returncode == 2 and "--overwrite" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    prepare(PrepConfig(inputs=inputs, output=str(out), vocab_size=300, overwrite=True,
                       quiet=True))
    assert open_dataset(str(out)).vocab_size == 300
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(PrepError, match="non-empty directory"):
        prepare(PrepConfig(inputs=inputs, output=str(other), overwrite=True, quiet=True))
    assert (other / "keep.txt").read_text() == "mine"


def test_errors_are_one_line_and_early(tmp_path):
    inputs = write_bad_corpus(tmp_path)
    out = str(tmp_path / "ds")
    cases = [
        (SourceError, "check the path", dict(inputs=[str(tmp_path / "missing.txt")])),
        (SourceError, "--text-field", dict(inputs=inputs, text_field="body")),
        (TokenizerError, "no such file", dict(inputs=inputs, tokenizer=str(tmp_path / "v.txt"))),
        (PrepError, "--heldout-fraction", dict(inputs=inputs, heldout_fraction=0.9)),
        (ValueError, "--splitter", dict(inputs=inputs, splitter="nope")),
    ]
    for exc, needle, kwargs in cases:
        with pytest.raises(exc, match=needle) as info:
            prepare(PrepConfig(output=out, quiet=True, **kwargs))
        assert "\n" not in str(info.value)
    (tmp_path / "v.txt").write_text("a\nb\nc\n")
    with pytest.raises(TokenizerError, match=r"lacks the special token\(s\) \[PAD\]"):
        prepare(PrepConfig(inputs=inputs, output=out, tokenizer=str(tmp_path / "v.txt")))
    assert not os.path.exists(out)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".ds.")]


def test_existing_tokenizer_files_and_datasets_inputs(tmp_path):
    inputs = write_bad_corpus(tmp_path)
    first = tmp_path / "first"
    prepare(PrepConfig(inputs=inputs, output=str(first), vocab_size=250, quiet=True))
    reference = np.asarray(open_dataset(str(first)).tokens)
    for name in ("vocab.txt", "tokenizer.json"):
        out = tmp_path / name.replace(".", "_")
        prepare(PrepConfig(inputs=inputs, output=str(out), tokenizer=str(first / name),
                           quiet=True))
        corpus = open_dataset(str(out))
        assert corpus.vocab_size == 250
        assert np.array_equal(np.asarray(corpus.tokens), reference)
    # A directory that is not made of .txt/.jsonl/.parquet goes to datasets.load_dataset.
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    rows = "\n".join(f'"{prose(4, i)}",{i}' for i in range(5))
    (csv_dir / "part.csv").write_text("text,id\n" + rows + "\n")
    out = tmp_path / "from_csv"
    summary = prepare(PrepConfig(inputs=[str(csv_dir)], output=str(out), vocab_size=200,
                                 quiet=True))
    assert summary["documents"] == 5
    assert open_dataset(str(out)).metadata["sources"][0]["kind"] == "hf"


def test_killed_prep_leaves_nothing_finished(tmp_path):
    inputs = write_bad_corpus(tmp_path)
    out = tmp_path / "ds"
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_prep.prep", *inputs, "--output", str(out), "--vocab-size",
         "200", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "MBERT_PREP_TEST_PAUSE_S": "120"})
    try:
        line = proc.stdout.readline()
        assert "pausing" in line, line
        leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".ds.partial-")]
        assert len(leftovers) == 1
        # Everything is written in the temporary directory, metadata.json included...
        assert os.path.isfile(tmp_path / leftovers[0] / "metadata.json")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    # ...yet nothing at the output path looks finished.
    assert not os.path.exists(out) and not is_prepared_dataset(out)
    done = run_cli(*inputs, "--output", str(out), "--vocab-size", "200", "--quiet")
    assert done.returncode == 0, done.stderr
    assert is_prepared_dataset(out)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".ds.")]


def test_cased_and_wide_vocabularies(tmp_path):
    inputs = write_bad_corpus(tmp_path)
    out = tmp_path / "wide"
    done = run_cli(*inputs, "--output", str(out), "--vocab-size", "70000", "--cased", "--quiet")
    assert done.returncode == 0, done.stderr
    corpus = open_dataset(str(out))
    meta = corpus.metadata
    assert meta["vocab_size"] == 70000 and meta["lowercase"] is False
    assert meta["token_dtype"] == "uint32" and corpus.tokens.dtype == np.uint32
    assert "The" in corpus.vocab and corpus.vocab[-1].startswith("[unused")
    # Padding entries are never real text, so never a random replacement token.
    assert len(corpus.replacement_ids) < 1000
