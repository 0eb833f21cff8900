"""Read Megatron-LM's indexed datasets (`PREFIX.bin` + `PREFIX.idx`), checked before use.

The layout is Megatron-core's "MMIDIDX" version 1 (`megatron/core/datasets/indexed_dataset.py`,
written by its `preprocess_data.py`), little-endian throughout::

    PREFIX.idx  9 bytes  magic b"MMIDIDX\\x00\\x00"
                u64      version, 1
                u8       dtype code of the token ids in PREFIX.bin (`DTYPE_CODES`)
                u64      S, the number of sequences
                u64      D, the number of document indices (documents + 1)
                i32[S]   tokens per sequence
                i64[S]   byte offset of each sequence in PREFIX.bin
                i64[D]   document indices: document d is sequences [doc[d], doc[d + 1]),
                         doc[0] = 0 and doc[D - 1] = S
                i8[S]    a mode per sequence, only in multimodal datasets (refused here)
    PREFIX.bin  the token ids of every sequence back to back, in the dtype of the code

BERT data is preprocessed with `--split-sentences`, so a sequence is one sentence.
`IndexedDataset` checks everything the header and the index promise (sizes, monotone document
indices, back-to-back sequences, the .bin holding exactly the tokens the index counts) and raises
`IndexedDataError`, one line naming the file, before anything is built on a corrupt pair. The
arrays stay memory-mapped and every scan runs in chunks, so memory stays flat.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Iterator

import numpy as np

from mbert_train.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # = 34
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
               6: np.float64, 7: np.float32, 8: np.uint16}
"""Megatron-core's `DType` table: code in the .idx -> NumPy dtype of the .bin."""
_CHUNK = 1 << 22


class IndexedDataError(UserError):
    """A Megatron indexed dataset that cannot be read; the message names the file and the fix."""


def prefix_of(path: str) -> str | None:
    """The prefix when `path` names a Megatron dataset (`P`, `P.bin` or `P.idx` of an existing
    `P.idx` or `P.bin`), else None."""
    if path.endswith((".idx", ".bin")) and not os.path.isdir(path):
        base = path[:-4]
        if os.path.isfile(path) or os.path.isfile(base + ".idx") or os.path.isfile(base + ".bin"):
            return base
    if not os.path.exists(path) and (os.path.isfile(path + ".idx")
                                     or os.path.isfile(path + ".bin")):
        return path
    return None


def _chunks(n: int, size: int = _CHUNK) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


class IndexedDataset:
    """One checked `PREFIX.bin` + `PREFIX.idx` pair, memory-mapped."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.idx_path, self.bin_path = prefix + ".idx", prefix + ".bin"
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise IndexedDataError(
                    f"{path}: no such file; a Megatron indexed dataset is the pair "
                    f"{os.path.basename(prefix)}.bin + {os.path.basename(prefix)}.idx: pass "
                    f"the prefix of a complete pair")
        self.dtype, n_seq, n_doc_idx = self._read_header()
        offset = HEADER_BYTES
        self.sequence_lengths = self._map(np.int32, offset, n_seq)
        offset += 4 * n_seq
        self.sequence_pointers = self._map(np.int64, offset, n_seq)
        offset += 8 * n_seq
        self.document_indices = self._map(np.int64, offset, n_doc_idx)
        self._check_index()
        self.num_tokens = self._check_pointers()
        self._check_bin()
        self.tokens = (np.memmap(self.bin_path, dtype=self.dtype, mode="r",
                                 shape=(self.num_tokens,))
                       if self.num_tokens else np.zeros(0, self.dtype))

    def _bad(self, path: str, what: str) -> IndexedDataError:
        return IndexedDataError(f"{path}: {what}; the Megatron indexed dataset {self.prefix} is "
                                f"corrupt: re-run Megatron's preprocess_data.py to rebuild it")

    def _read_header(self) -> tuple[np.dtype, int, int]:
        size = os.path.getsize(self.idx_path)
        with open(self.idx_path, "rb") as f:
            head = f.read(HEADER_BYTES)
        if head[:len(MAGIC)] != MAGIC[:len(head)]:
            raise IndexedDataError(
                f"{self.idx_path}: not a Megatron indexed-dataset index (it starts with "
                f"{head[:len(MAGIC)]!r}, not {MAGIC!r}); pass the prefix of a .bin/.idx pair "
                f"written by Megatron's preprocess_data.py")
        if len(head) < HEADER_BYTES:
            raise self._bad(self.idx_path, f"truncated to {size} bytes, shorter than the "
                                           f"{HEADER_BYTES}-byte header")
        version, code, n_seq, n_doc_idx = struct.unpack("<QBQQ", head[len(MAGIC):])
        if version != VERSION:
            raise IndexedDataError(
                f"{self.idx_path}: index version {version}; only version {VERSION} (MMIDIDX) is "
                f"known: re-run Megatron's preprocess_data.py with a current Megatron")
        if code not in DTYPE_CODES:
            raise self._bad(self.idx_path, f"unknown dtype code {code} (Megatron's are "
                                           f"{min(DTYPE_CODES)}-{max(DTYPE_CODES)})")
        dtype = np.dtype(DTYPE_CODES[code])
        if dtype.kind == "f":
            raise IndexedDataError(
                f"{self.idx_path}: dtype code {code} ({dtype.name}) holds no token ids; pass a "
                f"token dataset written by Megatron's preprocess_data.py")
        expected = HEADER_BYTES + 12 * n_seq + 8 * n_doc_idx
        if size == expected + n_seq and n_seq:
            raise IndexedDataError(
                f"{self.idx_path}: a multimodal dataset (it holds a mode per sequence); "
                f"mbert-prep reads text token datasets only")
        if size != expected:
            raise self._bad(self.idx_path, f"{size:,} bytes where its header ({n_seq:,} "
                                           f"sequences, {n_doc_idx:,} document indices) needs "
                                           f"{expected:,}: truncated or overwritten")
        return dtype, n_seq, n_doc_idx

    def _map(self, dtype, offset: int, count: int) -> np.ndarray:
        if count == 0:
            return np.zeros(0, dtype)
        return np.memmap(self.idx_path, dtype=dtype, mode="r", offset=offset, shape=(count,))

    def _check_index(self) -> None:
        doc, n_seq = self.document_indices, len(self.sequence_lengths)
        if len(doc) == 0 or int(doc[0]) != 0 or int(doc[-1]) != n_seq:
            ends = f"{int(doc[0])} to {int(doc[-1])}" if len(doc) else "nothing"
            raise self._bad(self.idx_path, f"its document indices run from {ends}, not 0 to "
                                           f"the {n_seq:,} sequences")
        for start, end in _chunks(len(doc) - 1):
            if (np.diff(doc[start:end + 1]) < 0).any():
                raise self._bad(self.idx_path, "its document indices decrease")
        for start, end in _chunks(n_seq):
            if (self.sequence_lengths[start:end] < 0).any():
                raise self._bad(self.idx_path, "it holds a negative sequence length")

    def _check_pointers(self) -> int:
        """Sequences lie back to back from byte 0 (as every Megatron writer lays them out);
        returns the total number of tokens."""
        item = self.dtype.itemsize
        total = 0
        for start, end in _chunks(len(self.sequence_lengths)):
            lengths = np.asarray(self.sequence_lengths[start:end], dtype=np.int64)
            starts = total + np.concatenate(([0], np.cumsum(lengths[:-1])))
            if not np.array_equal(self.sequence_pointers[start:end], starts * item):
                raise self._bad(self.idx_path, "its sequence offsets do not follow the sequence "
                                               "lengths back to back")
            total += int(lengths.sum())
        return total

    def _check_bin(self) -> None:
        size, need = os.path.getsize(self.bin_path), self.num_tokens * self.dtype.itemsize
        if size < need:
            raise self._bad(self.bin_path, f"{size:,} bytes where {self.idx_path} counts "
                                           f"{self.num_tokens:,} {self.dtype.name} tokens "
                                           f"({need:,} bytes): truncated")
        if size > need:
            raise self._bad(self.bin_path, f"{size:,} bytes, more than the {need:,} that "
                                           f"{self.idx_path} describes: the two files are from "
                                           f"different runs")

    @property
    def num_sequences(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def sequence(self, i: int) -> np.ndarray:
        """Token ids of sequence `i` (a view of the memory map)."""
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.sequence_lengths[i])]

    def token_range(self) -> tuple[int, int, str]:
        """(smallest id, largest id, sha256 of the .bin), one chunked pass; (0, -1, ...) if
        empty. The digest comes free with the scan and identifies the input in metadata."""
        digest = hashlib.sha256()
        low, high = 0, -1
        for start, end in _chunks(self.num_tokens):
            chunk = np.asarray(self.tokens[start:end])
            digest.update(chunk.tobytes())
            low = min(low, int(chunk.min())) if start else int(chunk.min())
            high = max(high, int(chunk.max()))
        return low, high, digest.hexdigest()

    def index_sha256(self) -> str:
        digest = hashlib.sha256()
        with open(self.idx_path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        return digest.hexdigest()
