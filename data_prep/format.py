"""The on-disk layout of a prepared corpus, shared by the writer (`mbert-prep`) and the reader.

A prepared corpus is a directory::

    metadata.json           written last: its presence marks a finished dataset
    tokenizer.json          the full `tokenizers` pipeline (normaliser, pre-tokeniser, WordPiece)
    vocab.txt               the same vocabulary, one token a line (for `BertTokenizer` users)
    tokens.npy              every token id of every kept document, in input order (uint16/uint32)
    sentence_offsets.npy    int64 [n_sentences + 1]: sentence i is tokens[off[i]:off[i+1]]
    doc_offsets.npy         int64 [n_documents + 1]: document d is sentences [off[d], off[d+1])
    train_docs.npy          int64: ids of the documents of the training split, ascending
    heldout_docs.npy        int64: ids of the held-out documents, ascending

All arrays are plain `.npy` files so readers open them with `np.load(mmap_mode="r")` and
resident memory stays flat however large the corpus is.
"""

from __future__ import annotations

import os

import numpy as np

FORMAT_NAME = "mbert-train-corpus"
FORMAT_VERSION = 1

METADATA_FILE = "metadata.json"
TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.txt"
TOKENS_FILE = "tokens.npy"
SENTENCE_OFFSETS_FILE = "sentence_offsets.npy"
DOC_OFFSETS_FILE = "doc_offsets.npy"
SPLIT_FILES = {"train": "train_docs.npy", "heldout": "heldout_docs.npy"}

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
# Order fixes the ids of a freshly trained vocabulary: [PAD]=0 matches ModelConfig.pad_token_id.
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
SPECIAL_KEYS = {PAD: "pad", UNK: "unk", CLS: "cls", SEP: "sep", MASK: "mask"}


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype holding every id of a `vocab_size` vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def is_prepared_dataset(path: str | os.PathLike) -> bool:
    """True when `path` is a directory holding a finished prepared corpus."""
    return os.path.isfile(os.path.join(path, METADATA_FILE))
