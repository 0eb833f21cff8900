"""The on-disk layout of a prepared corpus, shared by the writer (`mbert-prep`) and the reader.

A prepared corpus is a directory::

    metadata.json           written last; its "format": "mbert-train-corpus" marks a finished
                            dataset (a folder merely holding a file of that name is not one)
    tokenizer.json          the full `tokenizers` pipeline (normaliser, pre-tokeniser, WordPiece)
    vocab.txt               the same vocabulary, one token a line, line i = id i (BERT's format;
                            transformers 5: `BertTokenizer(vocab=PATH)`, not `vocab_file=`)
    tokens.npy              every token id of every kept document, in input order (uint16/uint32)
    sentence_offsets.npy    int64 [n_sentences + 1]: sentence i is tokens[off[i]:off[i+1]]
    doc_offsets.npy         int64 [n_documents + 1]: document d is sentences [off[d], off[d+1])
    train_docs.npy          int64: ids of the documents of the training split, ascending
    heldout_docs.npy        int64: ids of the held-out documents, ascending

All arrays are plain `.npy` files so readers open them with `np.load(mmap_mode="r")` and
resident memory stays flat however large the corpus is.
"""

from __future__ import annotations

import json
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

DATASET_FILES = frozenset({METADATA_FILE, TOKENIZER_FILE, VOCAB_FILE, TOKENS_FILE,
                           SENTENCE_OFFSETS_FILE, DOC_OFFSETS_FILE, *SPLIT_FILES.values()})
"""Everything `mbert-prep` writes into a dataset; `--overwrite` refuses a folder holding more."""

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
# Order fixes the ids of a freshly trained vocabulary: [PAD]=0 matches ModelConfig.pad_token_id.
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
SPECIAL_KEYS = {PAD: "pad", UNK: "unk", CLS: "cls", SEP: "sep", MASK: "mask"}


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype holding every id of a `vocab_size` vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def not_a_dataset_reason(path: str | os.PathLike) -> str | None:
    """Why `path` is not a finished prepared corpus, or None when it is one.

    A dataset is recognised by its own format marker in metadata.json, never by the mere
    presence of a file of that name: `mbert-prep --overwrite` deletes what this accepts.
    """
    meta_file = os.path.join(path, METADATA_FILE)
    if not os.path.isdir(path):
        return "not a directory"
    if not os.path.isfile(meta_file):
        return f"no {METADATA_FILE}"
    try:
        with open(meta_file, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError, RecursionError):
        return f"its {METADATA_FILE} is not readable JSON"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        return f'its {METADATA_FILE} has no "format": "{FORMAT_NAME}"'
    return None


def is_prepared_dataset(path: str | os.PathLike) -> bool:
    """True when `path` is a directory holding a finished prepared corpus (format marker)."""
    return not_a_dataset_reason(path) is None
