"""Read-only, memory-mapped access to a corpus written by `mbert-prep`."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from tokenizers import Tokenizer

from data_prep import format as fmt

# Tokens like "[unused7]" or "[CLS]": never real text, so never a random MLM replacement.
_BRACKETED = re.compile(r"^\[[^\]]+\]$")


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
        meta_file = os.path.join(self.path, fmt.METADATA_FILE)
        if not os.path.isfile(meta_file):
            raise ValueError(f"{path} is not a prepared dataset (no {fmt.METADATA_FILE}); "
                             f"create it with mbert-prep or set data.path=null for the default")
        with open(meta_file, encoding="utf-8") as f:
            self.metadata: dict = json.load(f)
        version = self.metadata.get("format_version")
        if self.metadata.get("format") != fmt.FORMAT_NAME or version != fmt.FORMAT_VERSION:
            raise ValueError(f"{meta_file}: format {self.metadata.get('format')} v{version} is "
                             f"not {fmt.FORMAT_NAME} v{fmt.FORMAT_VERSION}; re-run mbert-prep")
        self._open()

    def _open(self) -> None:
        def load(name: str) -> np.ndarray:
            return np.load(os.path.join(self.path, name), mmap_mode="r")

        # All three stay memory-mapped: the page cache shares them between DataLoader workers
        # and ranks, where private copies would multiply by the number of processes.
        self.tokens = load(fmt.TOKENS_FILE)
        self.sentence_offsets = load(fmt.SENTENCE_OFFSETS_FILE)
        self.doc_offsets = load(fmt.DOC_OFFSETS_FILE)

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
        return np.load(os.path.join(self.path, fmt.SPLIT_FILES[split]))

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


def check_vocab(metadata: dict, model_vocab_size: int, path: str) -> None:
    """Fail fast when the model's embedding does not match the dataset's tokenizer."""
    vocab = int(metadata["vocab_size"])
    if vocab != model_vocab_size:
        meta_file = os.path.join(path, fmt.METADATA_FILE)
        raise ValueError(
            f"model.vocab_size={model_vocab_size} does not match the dataset's tokenizer "
            f"(vocab_size={vocab} in {meta_file}); set model.vocab_size={vocab}, or re-run "
            f"mbert-prep with --vocab-size {model_vocab_size} (or a matching --tokenizer)")
