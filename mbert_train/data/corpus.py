"""Read-only, memory-mapped access to a corpus written by `mbert-prep`.

Opening a corpus checks it before anything is built on it, each failure one line naming the
file and the fix (`DatasetError`): the format marker and version, every `.npy` readable and of
the length metadata.json records (a truncated file fails here, not as an `IndexError` mid-run),
the offsets agreeing with the token count, the split ids in range, and every token id inside
the vocabulary. The largest token id comes from metadata.json's `max_token_id` for large
corpora and from a scan of `tokens.npy` for small ones or when it is absent (older datasets).

`fingerprint` names the corpus by what decides its samples, so that a resume can tell the
corpus it trained on from another one of the same size (see `PreparedCorpus.fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from tokenizers import Tokenizer

from data_prep import format as fmt
from mbert_train.errors import UserError, first_line

# Tokens like "[unused7]" or "[CLS]": never real text, so never a random MLM replacement.
_BRACKETED = re.compile(r"^\[[^\]]+\]$")
SCAN_TOKENS_UP_TO = 1 << 26
"""Corpora up to this many tokens (~0.1 s) have their largest id scanned, not read from
metadata.json: a hand-edited small dataset cannot slip past the check."""
_SCAN_CHUNK = 1 << 24
FINGERPRINT_KEYS = ("format_version", "tokenizer_sha256", "special_ids", "token_dtype", "num_documents",
                    "num_sentences", "num_tokens", "splits")
"""metadata.json entries a corpus fingerprint covers: what decides the samples (not timings,
paths or the prep settings that do not change the data)."""
_TOKEN_BLOCKS, _TOKEN_BLOCK = 64, 1 << 14


class DatasetError(UserError):
    """A prepared dataset that cannot be used as it is; the message names the file and the fix."""


def require_dataset(path: str, setting: str = "data.path") -> str:
    """`path` when it holds a prepared corpus (its format marker), else a one-line error."""
    reason = fmt.not_a_dataset_reason(path)
    if reason is not None:
        raise DatasetError(f"{setting}={path} is not a dataset written by mbert-prep ({reason}); "
                           f"run mbert-prep on your text first, or set {setting}=null for the "
                           f"embedded corpus")
    return path


def _max_token_id(tokens: np.ndarray) -> int:
    """Largest id in `tokens` (-1 when empty), scanned in chunks: memory stays flat."""
    return max((int(tokens[i:i + _SCAN_CHUNK].max()) for i in range(0, len(tokens), _SCAN_CHUNK)),
               default=-1)


@dataclass(frozen=True)
class SpecialIds:
    """Ids of BERT's special tokens in one vocabulary."""

    pad: int
    unk: int
    cls: int
    sep: int
    mask: int

    def as_array(self) -> np.ndarray:
        return np.array([self.pad, self.unk, self.cls, self.sep, self.mask], dtype=np.int64)


class PreparedCorpus:
    """Documents as sentences of token ids, memory-mapped; resident memory stays flat.

    Pickles as its path alone and re-opens the maps on the other side, so DataLoader workers
    (forked or spawned) never copy the arrays.
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        reason = fmt.not_a_dataset_reason(self.path)
        if reason is not None:
            raise DatasetError(f"{path} is not a prepared dataset ({reason}); create it with "
                               f"mbert-prep or set data.path=null for the embedded corpus")
        meta_file = os.path.join(self.path, fmt.METADATA_FILE)
        with open(meta_file, encoding="utf-8") as f:
            self.metadata: dict = json.load(f)
        version = self.metadata.get("format_version")
        if version != fmt.FORMAT_VERSION:
            raise DatasetError(f"{meta_file}: format {fmt.FORMAT_NAME} v{version} is not "
                               f"v{fmt.FORMAT_VERSION}; re-run mbert-prep")
        self._open()
        self._check()

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _load(self, name: str, mmap_mode: str | None = "r") -> np.ndarray:
        try:
            array = np.load(self._file(name), mmap_mode=mmap_mode)
        except (OSError, ValueError, EOFError) as exc:
            raise DatasetError(f"{self._file(name)} is missing, truncated or not a .npy array "
                               f"({first_line(exc)}); re-run mbert-prep to rebuild {self.path}"
                               ) from None
        if array.ndim != 1:
            raise DatasetError(f"{self._file(name)} has shape {array.shape}, not 1-D; re-run "
                               f"mbert-prep to rebuild {self.path}")
        return array

    def _open(self) -> None:
        # All three stay memory-mapped: the page cache shares them between DataLoader workers
        # and ranks, where private copies would multiply by the number of processes.
        self.tokens = self._load(fmt.TOKENS_FILE)
        self.sentence_offsets = self._load(fmt.SENTENCE_OFFSETS_FILE)
        self.doc_offsets = self._load(fmt.DOC_OFFSETS_FILE)

    def _meta_int(self, *keys: str) -> int:
        value = self.metadata
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if not isinstance(value, int) or isinstance(value, bool):
            raise DatasetError(f"{self._file(fmt.METADATA_FILE)} has no integer "
                               f"{'.'.join(keys)} ({value!r}); re-run mbert-prep")
        return value

    def _expect(self, name: str, what: str, found: int, expected: int) -> None:
        if found != expected:
            raise DatasetError(f"{self._file(name)} holds {found:,} {what} where "
                               f"{fmt.METADATA_FILE} says {expected:,}: truncated or from another "
                               f"run; re-run mbert-prep to rebuild {self.path}")

    def _check(self) -> None:
        """Lengths, offsets, split ids and token ids agree with metadata.json (see module doc)."""
        n_docs = self._meta_int("num_documents")
        n_sentences = self._meta_int("num_sentences")
        n_tokens = self._meta_int("num_tokens")
        self._expect(fmt.TOKENS_FILE, "tokens", len(self.tokens), n_tokens)
        self._expect(fmt.SENTENCE_OFFSETS_FILE, "offsets", len(self.sentence_offsets),
                     n_sentences + 1)
        self._expect(fmt.DOC_OFFSETS_FILE, "offsets", len(self.doc_offsets), n_docs + 1)
        ends = [(fmt.SENTENCE_OFFSETS_FILE, self.sentence_offsets, n_tokens, "tokens"),
                (fmt.DOC_OFFSETS_FILE, self.doc_offsets, n_sentences, "sentences")]
        for name, offsets, total, what in ends:
            if int(offsets[0]) != 0 or int(offsets[-1]) != total:
                raise DatasetError(f"{self._file(name)} runs from {int(offsets[0])} to "
                                   f"{int(offsets[-1])}, not 0 to the {total:,} {what}; re-run "
                                   f"mbert-prep to rebuild {self.path}")
        for split, name in fmt.SPLIT_FILES.items():
            ids = self._load(name, mmap_mode=None)
            self._expect(name, "document ids", len(ids), self._meta_int("splits", split))
            if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= n_docs):
                raise DatasetError(f"{self._file(name)} holds document ids outside [0, {n_docs}); "
                                   f"re-run mbert-prep to rebuild {self.path}")
        vocab = self._meta_int("vocab_size")
        if "max_token_id" not in self.metadata or n_tokens <= SCAN_TOKENS_UP_TO:
            self.metadata["max_token_id"] = _max_token_id(self.tokens)
        max_id = self._meta_int("max_token_id")
        if max_id >= vocab:
            raise DatasetError(f"{self._file(fmt.TOKENS_FILE)} holds token id {max_id}, outside "
                               f"its vocabulary of {vocab} ({fmt.METADATA_FILE} vocab_size); the "
                               f"dataset is corrupt: re-run mbert-prep to rebuild {self.path}")

    def __getstate__(self) -> dict:
        return {"path": self.path, "metadata": self.metadata}

    def __setstate__(self, state: dict) -> None:
        self.path, self.metadata = state["path"], state["metadata"]
        self._open()

    @property
    def vocab_size(self) -> int:
        return int(self.metadata["vocab_size"])

    @property
    def special(self) -> SpecialIds:
        return SpecialIds(**self.metadata["special_ids"])

    @property
    def num_documents(self) -> int:
        return len(self.doc_offsets) - 1

    def split_docs(self, split: str) -> np.ndarray:
        """Ascending document ids of `split` ('train' or 'heldout')."""
        return self._load(fmt.SPLIT_FILES[split], mmap_mode=None)

    def doc_sentences(self, doc: int) -> tuple[int, int]:
        """Global sentence range [start, end) of document `doc`."""
        return int(self.doc_offsets[doc]), int(self.doc_offsets[doc + 1])

    def sentence_span_tokens(self, start: int, end: int) -> np.ndarray:
        """Tokens of sentences [start, end) as one int64 array."""
        off = self.sentence_offsets
        return np.array(self.tokens[off[start]:off[end]], dtype=np.int64)

    def doc_of_sentence(self, sentence: int) -> int:
        return int(np.searchsorted(self.doc_offsets, sentence, side="right") - 1)

    @cached_property
    def fingerprint(self) -> str:
        """blake2b-128 (hex) of what decides the samples: the `FINGERPRINT_KEYS` of metadata.json,
        the document and sentence offsets, the split's document ids, and 64 evenly spaced blocks of
        16k tokens (the tokens in full would cost a read of the whole corpus). The same text
        split into sentences differently, or held out differently, has another fingerprint.
        Computed once, when first asked for (a resume, the first checkpoint): ~300 MB/s, 3 s for
        the 800 MB of offsets of 10^8 sentences."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(json.dumps({k: self.metadata.get(k) for k in FINGERPRINT_KEYS}, sort_keys=True).encode())
        arrays = [self.doc_offsets, self.sentence_offsets, *(self.split_docs(s) for s in sorted(fmt.SPLIT_FILES))]
        n = len(self.tokens)
        if n <= _TOKEN_BLOCKS * _TOKEN_BLOCK:
            arrays.append(self.tokens)
        else:
            arrays += [self.tokens[i:i + _TOKEN_BLOCK] for i in range(0, n, n // _TOKEN_BLOCKS)]
        for array in arrays:
            for i in range(0, len(array), _SCAN_CHUNK):
                digest.update(np.ascontiguousarray(array[i:i + _SCAN_CHUNK]).data)
        return digest.hexdigest()

    @cached_property
    def vocab(self) -> list[str]:
        """Token strings by id, from the dataset's tokenizer.json."""
        tok = Tokenizer.from_file(os.path.join(self.path, self.metadata["tokenizer_file"]))
        table = [""] * self.vocab_size
        for token, tid in tok.get_vocab(with_added_tokens=True).items():
            if tid < len(table):
                table[tid] = token
        return table

    @cached_property
    def continuation_mask(self) -> np.ndarray:
        """bool [vocab]: True for WordPiece continuation pieces ('##ing')."""
        return np.array([t.startswith("##") for t in self.vocab], dtype=bool)

    @cached_property
    def replacement_ids(self) -> np.ndarray:
        """Ids BERT's 10% random replacement may draw: real tokens, no special or unused."""
        ids = [i for i, t in enumerate(self.vocab) if t and not _BRACKETED.match(t)]
        return np.asarray(ids, dtype=np.int64)


def open_dataset(path: str) -> PreparedCorpus:
    """Open a prepared corpus directory (memory-mapped; cheap)."""
    return PreparedCorpus(path)


def resolve_vocab(metadata: dict, model_vocab_size: int | None, path: str) -> int:
    """The model's vocabulary size: the dataset tokenizer's when `model.vocab_size` is unset,
    else the one set, which must match it. Fails fast, before the model is built, on a mismatch
    or a token id of the dataset outside the embedding."""
    vocab = int(metadata["vocab_size"])
    if model_vocab_size is not None and vocab != model_vocab_size:
        meta_file = os.path.join(path, fmt.METADATA_FILE)
        raise DatasetError(
            f"model.vocab_size={model_vocab_size} does not match the dataset's tokenizer "
            f"(vocab_size={vocab} in {meta_file}); leave model.vocab_size unset (it then follows the "
            f"dataset) or set model.vocab_size={vocab}, or re-run mbert-prep with --vocab-size {model_vocab_size} (or a matching --tokenizer)")
    # Set by open_dataset (read or scanned); a mismatch here means a corrupt metadata.json.
    max_id = metadata.get("max_token_id")
    if isinstance(max_id, int) and max_id >= vocab:
        raise DatasetError(
            f"{os.path.join(path, fmt.TOKENS_FILE)} holds token id {max_id}, outside the tokenizer's "
            f"vocab_size={vocab}; the dataset is corrupt: re-run mbert-prep")
    return vocab


def resolve_pad(metadata: dict, model_pad_token_id: int | None, path: str) -> int:
    """The id of [PAD] the model embeds as padding: the dataset tokenizer's when
    `model.pad_token_id` is unset, else the one set, which must match it (a byte-level BPE such as
    ModernBERT's holds [PAD] at the end of its vocabulary: 50283, not BERT's 0)."""
    pad = int(metadata["special_ids"]["pad"])
    if model_pad_token_id is not None and model_pad_token_id != pad:
        raise DatasetError(
            f"model.pad_token_id={model_pad_token_id} does not match the dataset's tokenizer ([PAD] is "
            f"{pad} in {os.path.join(path, fmt.METADATA_FILE)}); leave model.pad_token_id unset (it then "
            f"follows the dataset) or set model.pad_token_id={pad}")
    return pad
