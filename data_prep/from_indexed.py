"""`mbert-prep` input from Megatron-LM indexed datasets: the token ids are kept, not re-tokenised.

    mbert-prep data/my-bert_text_sentence --vocab-file bert-large-uncased-vocab.txt -o data/wiki

An input that names a Megatron dataset (`PREFIX`, `PREFIX.bin` or `PREFIX.idx`) is read with
`data_prep.indexed`; several prefixes are concatenated in order, and `--heldout PREFIX...` names
held-out Megatron datasets (exactly the held-out split). Megatron's BERT data is
preprocessed with `--split-sentences`, so each sequence of the index is one sentence and each
document of its document indices one document: both boundaries carry over as they are. Empty
sequences and documents are dropped (and counted), and a sentence longer than
`--max-sentence-tokens` is cut into pieces as for text. The vocabulary file the data was
tokenised with (`--vocab-file`, an alias of `--tokenizer`) becomes the dataset's tokenizer, so
[CLS] [SEP] [MASK] [PAD] [UNK] are found by name and the HF export gets a working tokenizer.

Everything cheap is checked first, each failure one line naming the file: the .idx header,
sizes and indices, the .bin size, every token id inside the vocabulary, and at least one
document of two sentences (data preprocessed without `--split-sentences` has none, and BERT's
sentence-pair task cannot use it). The arrays are then written by the same `writer.write_arrays`
as text, fed by `TokenizedView` in the shape of the tokenised table. (Converting once, rather
than having the trainer read .bin/.idx, keeps one on-disk format, one set of checks and one
exactly-resumable sampler.)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from data_prep.config import PrepConfig, PrepError
from data_prep.sources import ReadStats, Source
from data_prep.tokenizer import load_tokenizer
from data_prep.writer import CorpusCounts
from data_prep.indexed import IndexedDataError, IndexedDataset, prefix_of

_DOCS_PER_CHUNK = 1 << 16


@dataclass
class IndexedInputs:
    """Checked Megatron datasets (training inputs first, then `--heldout` ones), the tokenizer
    of their vocabulary file, and the per-document counts."""

    datasets: list[IndexedDataset]
    tokenizer: Tokenizer
    sources: list[Source]
    heldout_sources: list[Source]
    counts: CorpusCounts
    heldout_inputs: np.ndarray | None
    """Input-document ids of the `--heldout` datasets; None when the split is drawn."""


def indexed_prefixes(inputs: list[str], flag: str = "input") -> list[str]:
    """The prefixes when the inputs name Megatron datasets, [] when none does."""
    prefixes = [prefix_of(item) for item in inputs]
    if not any(prefixes):
        return []
    if not all(prefixes):
        text = inputs[prefixes.index(None)]
        mega = inputs[[p is not None for p in prefixes].index(True)]
        raise PrepError(f"{flag} {text} is not a Megatron .bin/.idx prefix but {mega} is; "
                        f"mbert-prep converts either Megatron indexed datasets or text in one "
                        f"run: run it once for each")
    return prefixes


def _open(prefix: str, tokenizer_file: str, vocab_size: int, stats: ReadStats
          ) -> tuple[IndexedDataset, list[Source]]:
    try:
        ds = IndexedDataset(prefix)
    except IndexedDataError as exc:
        raise PrepError(str(exc)) from None
    low, high, bin_sha = ds.token_range()
    if low < 0 or high >= vocab_size:
        raise PrepError(f"{ds.bin_path} holds token id {low if low < 0 else high}, outside the "
                        f"{vocab_size} entries of --vocab-file {tokenizer_file}; pass the "
                        f"vocabulary the data was tokenised with")
    stats.checksums[ds.idx_path] = ds.index_sha256()
    stats.checksums[ds.bin_path] = bin_sha
    stats.files += 2
    stats.bytes_read += os.path.getsize(ds.idx_path) + os.path.getsize(ds.bin_path)
    return ds, [Source(ds.idx_path, "megatron_idx"), Source(ds.bin_path, "megatron_bin")]


def open_indexed(cfg: PrepConfig, stats: ReadStats) -> IndexedInputs | None:
    """Check the Megatron inputs and their vocabulary (nothing written); None for text inputs."""
    prefixes = indexed_prefixes(cfg.inputs)
    if not prefixes:
        return None
    held = indexed_prefixes(cfg.heldout, "--heldout") if cfg.heldout else []
    if cfg.heldout and not held:
        raise PrepError(f"--heldout {cfg.heldout[0]} is text but the inputs are Megatron indexed "
                        f"datasets; pass held-out Megatron prefixes, or --heldout-fraction")
    if not cfg.tokenizer:
        raise PrepError(f"{prefixes[0]} is a Megatron indexed dataset, which holds token ids "
                        f"only; pass the vocabulary it was tokenised with: --vocab-file "
                        f"VOCAB.txt (as Megatron's --vocab-file)")
    if not os.path.isfile(cfg.tokenizer):
        raise PrepError(f"--vocab-file {cfg.tokenizer}: no such file; pass the vocab.txt the "
                        f"Megatron data {prefixes[0]} was tokenised with")
    tok = load_tokenizer(cfg.tokenizer, lowercase=cfg.lowercase)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    opened = {"train": ([], []), "heldout": ([], [])}
    for split, group in (("train", prefixes), ("heldout", held)):
        for prefix in group:
            ds, sources = _open(prefix, cfg.tokenizer, vocab_size, stats)
            opened[split][0].append(ds)
            opened[split][1].extend(sources)
    datasets = opened["train"][0] + opened["heldout"][0]
    counts = count_indexed(datasets, cfg.max_sentence_tokens)
    n_train = sum(ds.num_documents for ds in opened["train"][0])
    heldout_inputs = np.arange(n_train, len(counts.kept), dtype=np.int64) if held else None
    return IndexedInputs(datasets, tok, opened["train"][1], opened["heldout"][1], counts,
                         heldout_inputs)


def _document_digests(ds: IndexedDataset) -> Iterator[bytes]:
    """A digest of each document's token ids, in order (documents equal token for token, and
    sentence boundaries aside, have the same digest)."""
    for s0, bounds in _doc_chunks(ds, _DOCS_PER_CHUNK):
        lengths = np.asarray(ds.sequence_lengths[s0:s0 + bounds[-1]], dtype=np.int64)
        t0 = int(ds.sequence_pointers[s0]) // ds.dtype.itemsize if len(lengths) else 0
        values = np.asarray(ds.tokens[t0:t0 + int(lengths.sum())], dtype=np.int64)
        starts = np.concatenate(([0], np.cumsum(lengths)))[bounds]
        for a, b in zip(starts[:-1], starts[1:]):
            yield hashlib.blake2b(values[a:b].tobytes(), digest_size=16).digest()


def heldout_copies(inputs: IndexedInputs) -> np.ndarray:
    """Input ids of the training documents whose token ids equal a `--heldout` document's (a
    held-out set that is the training data, or holds byte copies of it): as for text, such
    training documents are dropped from the training split and counted. Empty without
    `--heldout`."""
    if inputs.heldout_inputs is None:
        return np.zeros(0, dtype=np.int64)
    n_train = int(inputs.heldout_inputs[0]) if len(inputs.heldout_inputs) else len(inputs.counts.kept)
    digests = [d for ds in inputs.datasets for d in _document_digests(ds)]
    held = set(digests[n_train:])
    return np.array([i for i, d in enumerate(digests[:n_train]) if d in held], dtype=np.int64)


def _doc_chunks(ds: IndexedDataset, docs_per_chunk: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first sequence, document indices rebased to it) for runs of documents."""
    for d0 in range(0, ds.num_documents, docs_per_chunk):
        d1 = min(ds.num_documents, d0 + docs_per_chunk)
        bounds = np.asarray(ds.document_indices[d0:d1 + 1], dtype=np.int64)
        yield int(bounds[0]), bounds - bounds[0]


def _per_doc(per_sequence: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Sums of a per-sequence count over each document [bounds[d], bounds[d + 1])."""
    cum = np.concatenate(([0], np.cumsum(per_sequence, dtype=np.int64)))
    return np.diff(cum[bounds])


def _pieces(lengths: np.ndarray, max_tokens: int) -> np.ndarray:
    """Sentences each sequence becomes: 0 when empty, more than 1 when longer than the cap."""
    return -(-lengths // max_tokens)


def count_indexed(datasets: list[IndexedDataset], max_sentence_tokens: int) -> CorpusCounts:
    """Per-document sentence counts and totals, from the .idx files alone."""
    per_doc, long_sentences, tokens = [], 0, 0
    for ds in datasets:
        for s0, bounds in _doc_chunks(ds, _DOCS_PER_CHUNK):
            lengths = np.asarray(ds.sequence_lengths[s0:s0 + bounds[-1]], dtype=np.int64)
            per_doc.append(_per_doc(_pieces(lengths, max_sentence_tokens), bounds)
                           .astype(np.int32))
            long_sentences += int((lengths > max_sentence_tokens).sum())
        tokens += ds.num_tokens
    counts = CorpusCounts(np.concatenate(per_doc) if per_doc else np.zeros(0, np.int32),
                          tokens, long_sentences)
    if not (counts.sentences_per_doc >= 2).any():
        first = datasets[0].idx_path
        raise PrepError(f"{first}: no document holds two sentences (was it preprocessed without "
                        f"--split-sentences?); BERT's sentence-pair task needs them: re-run "
                        f"Megatron's preprocess_data.py with --split-sentences, or mbert-prep on "
                        f"the raw text")
    return counts


class TokenizedView:
    """The Megatron datasets as `mbert-prep`'s tokenised table: per document its flat token ids
    (`ids`), sentence lengths (`sent_lens`) and count of cut sentences (`long_sentences`), in
    Arrow batches, for `writer.write_arrays`. The ids are read from the .bin memory maps."""

    def __init__(self, inputs: IndexedInputs, max_sentence_tokens: int):
        self.datasets = inputs.datasets
        self.max_tokens = max_sentence_tokens

    def __len__(self) -> int:
        return sum(ds.num_documents for ds in self.datasets)

    def with_format(self, kind: str) -> "TokenizedView":
        if kind != "arrow":
            raise ValueError(f"TokenizedView serves Arrow batches only, not {kind}")
        return self

    def iter(self, batch_size: int) -> Iterator[pa.Table]:
        for ds in self.datasets:
            for s0, bounds in _doc_chunks(ds, batch_size):
                yield self._table(ds, s0, bounds)

    def _table(self, ds: IndexedDataset, s0: int, bounds: np.ndarray) -> pa.Table:
        m = self.max_tokens
        lengths = np.asarray(ds.sequence_lengths[s0:s0 + bounds[-1]], dtype=np.int64)
        t0 = int(ds.sequence_pointers[s0]) // ds.dtype.itemsize if len(lengths) else 0
        values = np.asarray(ds.tokens[t0:t0 + int(lengths.sum())])
        token_offsets = np.concatenate(([0], np.cumsum(lengths)))[bounds]
        # Sequence i becomes pieces of m tokens, the last one shorter: piece k of it has
        # min(m, length - k*m) tokens.
        pieces = _pieces(lengths, m)
        first_piece = np.cumsum(pieces) - pieces
        owner_length = np.repeat(lengths, pieces)
        k = np.arange(int(pieces.sum())) - np.repeat(first_piece, pieces)
        piece_lengths = np.minimum(m, owner_length - k * m).astype(np.int32)
        piece_offsets = np.concatenate(([0], np.cumsum(pieces)))[bounds]
        long_per_doc = _per_doc(lengths > m, bounds).astype(np.int32)
        return pa.table({
            "ids": pa.LargeListArray.from_arrays(pa.array(token_offsets), pa.array(values)),
            "sent_lens": pa.LargeListArray.from_arrays(pa.array(piece_offsets),
                                                       pa.array(piece_lengths)),
            "long_sentences": pa.array(long_per_doc),
        })
