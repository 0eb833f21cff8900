"""Tokenise documents with `datasets.map` and write the flat memory-mappable arrays.

Documents are first spooled to an Arrow stream file (`spool_documents`), so the multi-process
`map` and the tokenizer trainer read them from disk; tokenisation turns each document into its
sentences' token ids; `write_arrays` streams the result into `.npy` files created at their final
size with `open_memmap`. Nothing here holds more than one batch of documents in memory, except
the per-document sentence counts (one int32 a document) used to pick the held-out split.
"""

from __future__ import annotations

import errno
import hashlib
import os
from dataclasses import dataclass
from typing import Callable, Iterable

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.lib.format import open_memmap
from tokenizers import Tokenizer

from data_prep import format as fmt
from data_prep.split import get_splitter

_TOKENIZERS: dict[str, Tokenizer] = {}


def spool_documents(docs: Iterable[str], path: str, batch_docs: int = 1024) -> int:
    """Write documents to an Arrow stream file with one `text` column; returns the count."""
    schema = pa.schema([("text", pa.large_string())])
    count = 0
    batch: list[str] = []
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for doc in docs:
            batch.append(doc)
            if len(batch) == batch_docs:
                writer.write_batch(pa.record_batch([pa.array(batch, pa.large_string())],
                                                   schema=schema))
                count += len(batch)
                batch = []
        if batch:
            writer.write_batch(pa.record_batch([pa.array(batch, pa.large_string())],
                                               schema=schema))
            count += len(batch)
    return count


def _tokenizer(tokenizer_json: str) -> Tokenizer:
    # One tokenizer per worker process, built on first use; the key is the JSON's digest.
    key = hashlib.sha1(tokenizer_json.encode()).hexdigest()
    if key not in _TOKENIZERS:
        tok = Tokenizer.from_str(tokenizer_json)
        tok.encode_special_tokens = True
        _TOKENIZERS[key] = tok
    return _TOKENIZERS[key]


def tokenize_batch(batch: dict[str, list], *, tokenizer_json: str, splitter: str,
                   max_sentence_tokens: int, dtype: str) -> dict[str, list]:
    """`datasets.map` function: documents -> flat token ids and sentence lengths per document.

    A sentence longer than `max_sentence_tokens` (a paragraph without punctuation, a table) is
    cut into pieces of that size so that BERT's sentence-pair sampler can still use it.
    """
    tok = _tokenizer(tokenizer_json)
    split = get_splitter(splitter)
    owners: list[int] = []
    sentences: list[str] = []
    for d, text in enumerate(batch["text"]):
        pieces = split(text)
        sentences.extend(pieces)
        owners.extend([d] * len(pieces))
    # encode_batch_fast skips character offsets, which we never use: ~2x faster.
    encodings = tok.encode_batch_fast(sentences, add_special_tokens=False) if sentences else []
    n_docs = len(batch["text"])
    ids: list[list[np.ndarray]] = [[] for _ in range(n_docs)]
    lens: list[list[int]] = [[] for _ in range(n_docs)]
    long_sentences = [0] * n_docs
    for d, enc in zip(owners, encodings):
        sent = np.asarray(enc.ids, dtype=dtype)
        if sent.size == 0:
            continue
        if sent.size > max_sentence_tokens:
            long_sentences[d] += 1
        for start in range(0, sent.size, max_sentence_tokens):
            piece = sent[start:start + max_sentence_tokens]
            ids[d].append(piece)
            lens[d].append(piece.size)
    return {
        "ids": [np.concatenate(p) if p else np.zeros(0, dtype=dtype) for p in ids],
        "sent_lens": [np.asarray(n, dtype=np.int32) for n in lens],
        "long_sentences": long_sentences,
    }


def tokenized_features(dtype: np.dtype) -> datasets.Features:
    return datasets.Features({
        "ids": datasets.Sequence(datasets.Value(dtype.name)),
        "sent_lens": datasets.Sequence(datasets.Value("int32")),
        "long_sentences": datasets.Value("int32"),
    })


@dataclass
class CorpusCounts:
    """Totals over the tokenised documents, computed from the Arrow columns only."""

    sentences_per_doc: np.ndarray  # int32 [n_input_documents]
    tokens: int
    long_sentences: int

    @property
    def kept(self) -> np.ndarray:
        return self.sentences_per_doc > 0


def count_corpus(tokenized, batch_size: int = 8192) -> CorpusCounts:
    per_doc = []
    tokens = 0
    long_sentences = 0
    for table in tokenized.with_format("arrow").iter(batch_size=batch_size):
        per_doc.append(pc.list_value_length(table.column("sent_lens")).to_numpy(
            zero_copy_only=False).astype(np.int32))
        tokens += int(pc.sum(pc.list_value_length(table.column("ids"))).as_py() or 0)
        long_sentences += int(pc.sum(table.column("long_sentences")).as_py() or 0)
    sentences = np.concatenate(per_doc) if per_doc else np.zeros(0, np.int32)
    return CorpusCounts(sentences, tokens, long_sentences)


def count_sentences(batch: dict[str, list], *, splitter: str) -> dict[str, list]:
    """`datasets.map` function: the splitter's sentence count of each document."""
    split = get_splitter(splitter)
    return {"sentences": [len(split(text)) for text in batch["text"]]}


def choose_heldout(sentences_per_doc: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Held-out document ids (among input documents), a deterministic function of the
    splitter's sentence counts, so chosen before (and whatever) the tokenizer.

    Drawn from documents with 2+ sentences, the only ones that yield NSP/SOP samples, and at
    least 2 of them so that a random-next B exists; none when that would leave the training
    split fewer than 2 such documents.
    """
    if fraction <= 0:
        return np.zeros(0, np.int64)
    multi = np.flatnonzero(sentences_per_doc >= 2)
    k = max(2, int(round(fraction * len(multi))))
    if len(multi) - k < 2:
        return np.zeros(0, np.int64)
    rng = np.random.default_rng([seed, len(sentences_per_doc)])
    return np.sort(rng.choice(multi, size=k, replace=False)).astype(np.int64)


def _allocated_memmap(path: str, dtype: np.dtype, length: int) -> np.memmap:
    """A new .npy of `length` items, its blocks reserved on disk now: a full disk then fails
    here with ENOSPC instead of killing the process with SIGBUS while writing the mapping."""
    array = open_memmap(path, mode="w+", dtype=dtype, shape=(length,))
    size = os.path.getsize(path)
    if hasattr(os, "posix_fallocate") and size > 0:
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        finally:
            os.close(fd)
    return array


def _save(path: str, values: np.ndarray) -> None:
    """`np.save` through a reserved file: a full disk then raises ENOSPC, not a short write."""
    array = _allocated_memmap(path, values.dtype, values.size)
    array[:] = values
    array.flush()
    del array


def write_arrays(tokenized, counts: CorpusCounts, heldout: np.ndarray, out_dir: str,
                 dtype: np.dtype, progress: Callable[[int], None],
                 batch_size: int = 8192, not_trained: np.ndarray | None = None) -> int:
    """Stream tokens, sentence and document offsets, and the split lists into `out_dir`;
    documents in `not_trained` (ids among the kept documents) are in neither split.

    Returns the largest token id written (-1 when there are none), for metadata.json.
    """
    kept = counts.kept
    n_docs = int(kept.sum())
    n_sentences = int(counts.sentences_per_doc.sum())
    tokens = _allocated_memmap(os.path.join(out_dir, fmt.TOKENS_FILE), dtype, counts.tokens)
    sent_off = _allocated_memmap(os.path.join(out_dir, fmt.SENTENCE_OFFSETS_FILE), np.int64,
                                 n_sentences + 1)
    doc_off = np.zeros(n_docs + 1, dtype=np.int64)
    doc_off[1:] = np.cumsum(counts.sentences_per_doc[kept])
    _save(os.path.join(out_dir, fmt.DOC_OFFSETS_FILE), doc_off)
    sent_off[0] = 0
    tok_pos = 0
    sent_pos = 0
    max_id = -1
    for table in tokenized.with_format("arrow").iter(batch_size=batch_size):
        flat = pc.list_flatten(table.column("ids")).to_numpy(zero_copy_only=False)
        lens = pc.list_flatten(table.column("sent_lens")).to_numpy(zero_copy_only=False)
        tokens[tok_pos:tok_pos + flat.size] = flat
        if flat.size:
            max_id = max(max_id, int(flat.max()))
        sent_off[sent_pos + 1:sent_pos + 1 + lens.size] = tok_pos + np.cumsum(lens, dtype=np.int64)
        tok_pos += flat.size
        sent_pos += lens.size
        progress(table.num_rows)
    tokens.flush()
    sent_off.flush()
    del tokens, sent_off
    outside = heldout if not_trained is None else np.union1d(heldout, not_trained)
    train = np.setdiff1d(np.arange(n_docs, dtype=np.int64), outside, assume_unique=True)
    _save(os.path.join(out_dir, fmt.SPLIT_FILES["train"]), train)
    _save(os.path.join(out_dir, fmt.SPLIT_FILES["heldout"]), heldout.astype(np.int64))
    return max_id
