"""mbert-prep end to end: every kind of bad input counted, refusals, atomic output, tokenizers."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from data_prep import PrepConfig, PrepError
from data_prep import writer
from data_prep.prep import main, prepare
from data_prep.format import is_prepared_dataset
from data_prep.sources import SourceError
from data_prep.split import split_rules
from data_prep.tokenizer import TokenizerError
from mbert_train.data import open_dataset
from tests.train_util import run_python

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
    """`python -m data_prep.prep ARGS` on a forked preloaded interpreter (tests/train_util.py);
    test_killed_prep_leaves_nothing_finished starts the real one."""
    return run_python("data_prep.prep", list(args), environ={**os.environ, **(env or {})}, timeout=240)


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


def byte_level_bpe(inputs: list[str]) -> Tokenizer:
    """A 300-entry byte-level BPE trained on `inputs`, then [UNK] [CLS] [SEP] [PAD] [MASK] (ids
    300-304), the way ModernBERT's tokenizer holds them."""
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [Path(path).read_text(errors="replace") for path in inputs if path.endswith((".txt", ".jsonl"))]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"])
    return tok


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
    # A byte-level BPE with BERT's special tokens at the end of its vocabulary, as ModernBERT's:
    # the ids are its own, the case is kept, and the model's vocabulary is the tokenizer's.
    bpe = tmp_path / "bpe.json"
    byte_level_bpe(inputs).save(str(bpe))
    out = tmp_path / "bpe"
    prepare(PrepConfig(inputs=inputs, output=str(out), tokenizer=str(bpe), quiet=True))
    corpus = open_dataset(str(out))
    meta = corpus.metadata
    assert meta["lowercase"] is False and meta["vocab_size"] == 305
    assert meta["special_ids"] == {"unk": 300, "cls": 301, "sep": 302, "pad": 303, "mask": 304}
    assert int(np.asarray(corpus.tokens).max()) < 300  # the text holds no special token
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


@pytest.mark.slow
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
        leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".ds.tmp-")]
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


def tree(root) -> dict[str, bytes]:
    """Every file under `root` (hidden ones too) with its bytes."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait(timeout=30)
    return proc.pid


def one_line_error(capsys, argv: list[str]) -> str:
    """`mbert-prep ARGV` in this process: exit 2 and one `error:` line, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mbert-prep: error: "), err
    return err[0]


def test_overwrite_replaces_only_a_recognised_dataset(tmp_path):
    inputs = write_bad_corpus(tmp_path)
    # A folder of the user's that merely holds a file named metadata.json.
    proj = tmp_path / "proj"
    (proj / "sub").mkdir(parents=True)
    (proj / "metadata.json").write_text('{"name": "my project", "format": "mine"}')
    (proj / "notes.txt").write_text("mine")
    (proj / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = tree(proj)
    done = run_cli(*inputs, "--output", str(proj), "--overwrite", "--vocab-size", "200",
                   "--quiet")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "not a prepared dataset" in done.stderr and "--overwrite" not in done.stderr
    assert tree(proj) == before
    # A dataset the user has added files to is not replaced either.
    ds = tmp_path / "ds"
    prepare(PrepConfig(inputs=inputs, output=str(ds), vocab_size=200, quiet=True))
    (ds / "my-notes.txt").write_text("mine")
    before = tree(ds)
    with pytest.raises(PrepError, match="my-notes.txt"):
        prepare(PrepConfig(inputs=inputs, output=str(ds), vocab_size=300, overwrite=True,
                           quiet=True))
    assert tree(ds) == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith((".proj.", ".ds."))]


def test_a_kill_mid_swap_loses_no_dataset_and_leaves_nothing(tmp_path):
    inputs = write_bad_corpus(tmp_path)
    ds = tmp_path / "ds"
    prepare(PrepConfig(inputs=inputs, output=str(ds), vocab_size=200, quiet=True))
    before = tree(ds)
    # What `--overwrite` leaves when killed between its two renames: the old dataset moved
    # aside, no dataset at the output, the new one complete in its temporary folder.
    pid = dead_pid()
    old, new = tmp_path / f".ds.old-{pid}-0123456789ab", tmp_path / f".ds.tmp-{pid}-ba9876543210"
    shutil.copytree(ds, new)
    os.rename(ds, old)
    done = run_cli(*inputs, "--output", str(ds), "--vocab-size", "200", "--quiet")
    assert done.returncode == 2 and "already holds a prepared dataset" in done.stderr, done.stderr
    assert tree(ds) == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".ds.")]


def test_hostile_inputs_are_counted_and_the_vocabulary_capped(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "prose.txt").write_text("\n\n".join(prose(6, i) for i in range(6)))
    (folder / "MORE.TXT").write_text(prose(6, 50))
    lines = ["[" * 100_000 + "]" * 100_000,                   # RecursionError in json.loads
             json.dumps({"text": prose(5, 1)}),
             '{"text": "A lone \\ud800 surrogate. ' + prose(3, 2) + '"}']
    (folder / "records.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "junk.txt").write_bytes(np.random.default_rng(0).bytes(20_000))
    (folder / "table.csv").write_text("a,b\n1,2\n")
    (folder / "photo.PNG").write_bytes(b"\x89PNG\r\n")
    out = tmp_path / "ds"
    done = run_cli(str(folder), "--output", str(out), "--vocab-size", "100")
    assert done.returncode == 0, done.stderr
    meta = json.loads((out / "metadata.json").read_text())
    s = meta["summary"]
    assert s["files"] == 4 and s["unknown_files"] == 2
    assert s["bad_json_lines"] == 1 and s["lone_surrogates"] == 1
    for needle in ("bad JSON lines 1", "lone surrogates 1", "files of unknown type 2"):
        assert needle in done.stdout, done.stdout
    # Binary junk brings hundreds of characters; WordPiece used to add them all on top.
    assert meta["vocab_size"] == 100
    assert len((out / "vocab.txt").read_text(encoding="utf-8").splitlines()) == 100
    assert 0 < meta["max_token_id"] < 100
    assert int(np.max(open_dataset(str(out)).tokens)) == meta["max_token_id"]


def test_hostile_outputs_and_empty_inputs_fail_in_one_line(tmp_path, capsys, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    inputs = write_bad_corpus(src)
    args = ["--vocab-size", "200", "--quiet"]
    out = tmp_path / "out"
    # Empty or whitespace-only input: no dataset at all, not an empty one.
    (tmp_path / "blank.txt").write_text("  \n\n\t \n")
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": "  "}) + "\n")
    line = one_line_error(capsys, [str(tmp_path / "blank.txt"), str(tmp_path / "blank.jsonl"),
                                   "--output", str(out), *args])
    assert "no documents" in line
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".out.")]
    # An output inside an input folder would be read as input by the next run.
    line = one_line_error(capsys, [str(src), "--output", str(src / "ds"), *args])
    assert "inside the input folder" in line and not (src / "ds").exists()
    # --output a symbolic link to a dataset: refused, link and dataset untouched.
    ds = tmp_path / "ds"
    prepare(PrepConfig(inputs=inputs, output=str(ds), vocab_size=200, quiet=True))
    before = tree(ds)
    (tmp_path / "link").symlink_to(ds)
    line = one_line_error(capsys, [*inputs, "--output", str(tmp_path / "link"), "--overwrite",
                                   *args])
    assert "symbolic link" in line and "--overwrite" not in line
    assert os.readlink(tmp_path / "link") == str(ds) and tree(ds) == before
    # A full disk: one line naming the output, the old dataset kept, nothing left behind.
    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer, "open_memmap", full)
    line = one_line_error(capsys, [*inputs, "--output", str(ds), "--overwrite", *args])
    assert str(ds) in line and "no space left" in line
    assert tree(ds) == before and not [p for p in os.listdir(tmp_path) if p.startswith(".ds.")]
    monkeypatch.undo()
    # A splitter that does not exist (a ValueError with a traceback before).
    line = one_line_error(capsys, [*inputs, "--output", str(out), "--splitter", "nope", *args])
    assert "--splitter nope" in line


NATO = ("alpha bravo charlie delta echo foxtrot golf hotel india juliett kilo lima mike november "
        "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def nato_doc(word: str) -> str:
    """A document whose one rare word occurs 3 times: a trained vocabulary of 400 holds it
    whole if and only if the tokenizer saw the document."""
    return f"The {word} walks home. A {word} sees the sea. Every {word} sleeps at night."


def doc_tokens(corpus, doc: int) -> list[int]:
    return corpus.sentence_span_tokens(*corpus.doc_sentences(doc)).tolist()


def test_heldout_files_are_the_heldout_split_and_never_train_the_tokenizer(tmp_path):
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    train_words, held_words = NATO[:20], NATO[20:]
    # A copy of a held-out document among the training ones, and the held-out file inside the
    # input folder: neither may reach the training split.
    (corpus_dir / "a.txt").write_text("\n\n".join(map(nato_doc, [*train_words, held_words[3]])) + "\n")
    (corpus_dir / "held.txt").write_text("\n\n".join(map(nato_doc, held_words)) + "\n")
    out = tmp_path / "ds"
    assert main([str(corpus_dir), "--heldout", str(corpus_dir / "held.txt"), "--output", str(out),
                 "--vocab-size", "400", "--quiet"]) == 0
    corpus = open_dataset(str(out))
    meta = corpus.metadata
    assert meta["summary"]["heldout_documents"] == len(held_words)
    assert meta["summary"]["train_documents"] == len(train_words)
    assert meta["summary"]["heldout_copies_dropped"] == 1
    assert {(os.path.basename(s["path"]), s["split"]) for s in meta["sources"]} == {("a.txt", "train"),
                                                                                    ("held.txt", "heldout")}
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    vocab = tok.get_vocab()
    assert all(w in vocab for w in train_words) and not any(w in vocab for w in held_words)
    # The held-out split holds exactly the held-out file's documents, token for token ...
    expected = [[t for sent in split_rules(nato_doc(w)) for t in tok.encode(sent, add_special_tokens=False).ids]
                for w in held_words]
    held = [doc_tokens(corpus, d) for d in corpus.split_docs("heldout")]
    assert held == expected
    # ... and no training document is one of them.
    train = [doc_tokens(corpus, d) for d in corpus.split_docs("train")]
    assert len(train) == len(train_words) and not any(doc in held for doc in train)
    # Control: read as a training input, the held-out file's words do enter the vocabulary.
    assert main([str(corpus_dir), "--output", str(tmp_path / "all"), "--vocab-size", "400", "--quiet"]) == 0
    vocab_all = Tokenizer.from_file(str(tmp_path / "all" / "tokenizer.json")).get_vocab()
    assert all(w in vocab_all for w in held_words)


def test_heldout_fraction_documents_never_train_the_tokenizer(tmp_path):
    (tmp_path / "c.txt").write_text("\n\n".join(map(nato_doc, NATO)) + "\n")
    prepare(PrepConfig(inputs=[str(tmp_path / "c.txt")], output=str(tmp_path / "ds"), vocab_size=400,
                       heldout_fraction=0.2, quiet=True))
    corpus = open_dataset(str(tmp_path / "ds"))
    held = set(corpus.split_docs("heldout").tolist())
    assert 2 <= len(held) < len(NATO)
    vocab = Tokenizer.from_file(str(tmp_path / "ds" / "tokenizer.json")).get_vocab()
    assert [w in vocab for w in NATO] == [i not in held for i in range(len(NATO))]


def test_heldout_flag_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "c.txt").write_text("\n\n".join(map(nato_doc, NATO)) + "\n")
    (tmp_path / "blank.txt").write_text("  \n\n")
    args = ["--output", str(tmp_path / "ds"), "--vocab-size", "400", "--quiet"]
    line = one_line_error(capsys, [str(tmp_path / "c.txt"), "--heldout", str(tmp_path / "blank.txt"), *args])
    assert "--heldout" in line and "no documents" in line
    line = one_line_error(capsys, [str(tmp_path / "c.txt"), "--heldout", str(tmp_path / "c.txt"), *args])
    assert "every input is also a --heldout file" in line
    with pytest.raises(PrepError, match="pass only one of them"):
        PrepConfig(inputs=["x"], output="y", heldout=["z"], heldout_fraction=0.1)
    assert not (tmp_path / "ds").exists()


def test_prepared_tokenizer_adds_cls_and_sep(tmp_path):
    from transformers import AutoTokenizer

    (tmp_path / "c.txt").write_text("\n\n".join(map(nato_doc, NATO)) + "\n")
    out = tmp_path / "ds"
    prepare(PrepConfig(inputs=[str(tmp_path / "c.txt")], output=str(out), vocab_size=400, quiet=True))
    cls, sep = open_dataset(str(out)).special.cls, open_dataset(str(out)).special.sep
    enc = Tokenizer.from_file(str(out / "tokenizer.json")).encode("alpha walks", "the sea")
    assert enc.tokens[0] == "[CLS]" and enc.tokens.count("[SEP]") == 2 and enc.tokens[-1] == "[SEP]"
    assert enc.type_ids == [0] * (enc.tokens.index("[SEP]") + 1) + [1] * (len(enc.tokens) - enc.tokens.index("[SEP]") - 1)
    ids = AutoTokenizer.from_pretrained(str(out))("alpha walks")["input_ids"]
    assert ids[0] == cls and ids[-1] == sep and len(ids) == 4
    # The corpus itself is stored without them: the sampler adds [CLS]/[SEP] per sample.
    tokens = np.asarray(open_dataset(str(out)).tokens)
    assert not np.isin(tokens, [cls, sep]).any()
